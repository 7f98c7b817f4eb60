#!/bin/sh
# Runs the whole benchmark suite and writes BENCHMARKS.md at the repository root.
#
#   tests/bench/run.sh [report options]     e.g. --runs 5, --quick, --only latency,peer
#
# Builds the release binaries, installs what the peer comparison needs when it
# can (oidc-agent-cli with apt, the test oidc-provider with npm), then runs the
# `report` bench of tests/. Nothing is skipped silently: a missing tool becomes
# a "skipped: why" row in the report.
set -eu
cd "$(dirname "$0")/../.."
root=$(pwd)

cargo build --release --workspace --bins
cargo bench -p kontext-broker-tests --bench report --no-run

if ! command -v oidc-token >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "run.sh: oidc-agent-cli is missing; installing it with apt-get" >&2
        apt-get install -y --no-install-recommends oidc-agent-cli >&2 \
            || echo "run.sh: apt-get could not install oidc-agent-cli; the peer comparison is skipped" >&2
    else
        echo "run.sh: oidc-agent-cli is missing and cannot be installed here (needs root and apt-get); the peer comparison is skipped" >&2
    fi
fi
if [ ! -d tests/idp/node_modules ] && command -v npm >/dev/null 2>&1; then
    npm ci --prefix tests/idp --no-audit --no-fund >&2
fi

exec cargo bench -p kontext-broker-tests --bench report -- --out "$root/BENCHMARKS.md" "$@"
