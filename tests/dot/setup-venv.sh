#!/bin/sh
# Creates the Python venv for the django-oauth-toolkit test server (TEST FIXTURE
# ONLY): setup-venv.sh VENV_DIR. Reuses an existing venv whose stamp matches
# requirements.txt byte for byte; otherwise recreates it from PyPI and migrates a
# template database (VENV_DIR/migrated.sqlite3) that each server start copies.
# Used by tests/src/dot.rs on first use and by .ci/run. Prints what it did.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
# Absolute, because the template step below runs from this directory.
mkdir -p "$1"
venv=$(cd "$1" && pwd)
req="$here/requirements.txt"
stamp="$venv/kontext-requirements.txt"

if [ -f "$stamp" ] && cmp -s "$req" "$stamp" && [ -f "$venv/migrated.sqlite3" ]; then
  echo "reused $venv"
  exit 0
fi
rm -rf "$venv"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input -r "$req"
(cd "$here" && DOT_TEMPLATE_DB="$venv/migrated.sqlite3" "$venv/bin/python" serve.py --prepare-template)
cp "$req" "$stamp"
echo "created $venv"
