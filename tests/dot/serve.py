#!/usr/bin/env python3
# =====================================================================================
#  TEST FIXTURE ONLY. NEVER DEPLOY THIS.
#
#  Starts django-oauth-toolkit (DOT) as a second real authorization server for
#  kontext-broker's integration tests: migrates a fresh sqlite database, creates the
#  test clients, and serves with waitress on 127.0.0.1. Any login name is accepted,
#  secrets are fixed test values, and `/test/*` routes hand out and kill tokens.
#
#  Started by `tests/src/dot.rs` with the venv's python. Protocol with the launcher:
#    - env PORT (default 0 = the OS picks), DOT_ACCESS_TOKEN_TTL (seconds, default 5),
#      DOT_DB (sqlite file to create; required), DOT_TEMPLATE_DB (optional: a
#      migrated database to copy instead of migrating, which takes seconds);
#    - prints exactly one line `READY http://127.0.0.1:PORT/o` (the issuer) on stdout
#      once it accepts connections;
#    - exits when its stdin closes, so a killed test run leaves no orphan behind.
#  `serve.py --prepare-template` only migrates DOT_TEMPLATE_DB and exits (used by
#  setup-venv.sh: the template belongs to the venv, so it is as fresh as the pins).
# =====================================================================================

import os
import shutil
import socket
import sys
import threading

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

PUBLIC_CLIENT_ID = "kontext-cli"
DEVICE_CLIENT_ID = "kontext-device"
CONFIDENTIAL_CLIENT_ID = "kontext-confidential"
# Awkward on purpose: RFC 6749 §2.3.1 form-encodes it inside HTTP Basic auth.
CONFIDENTIAL_CLIENT_SECRET = "kontext-dot secret:+/=%&?\"'-not-for-production"
# RFC 8252 §7.3: DOT accepts this loopback redirect on any port.
REDIRECT_URI = "http://127.0.0.1/callback"


def exit_with_parent():
    """The launcher holds our stdin open for as long as it lives."""
    try:
        while sys.stdin.buffer.read(4096):
            pass
    finally:
        os._exit(0)


def bind(port):
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    return sock


def prepare_template(template):
    """Migrates a new database into `template` (atomically replaced)."""
    partial = f"{template}.{os.getpid()}.tmp"
    os.environ["DOT_DB"] = partial
    os.environ.setdefault("DOT_BASE_URL", "http://127.0.0.1:0")
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "kontext_dot.settings")
    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", verbosity=0, interactive=False)
    os.replace(partial, template)


def prepare_database(db, template):
    """Copies the migrated template, or migrates `db` when there is none."""
    if template and os.path.isfile(template):
        # The template holds only DOT's and Django's tables, migrated by the
        # same pinned packages as this venv: copying it is current by construction.
        shutil.copyfile(template, db)
        return
    from django.core.management import call_command

    call_command("migrate", verbosity=0, interactive=False)


def create_clients():
    from oauth2_provider.models import get_application_model

    Application = get_application_model()
    common = {"algorithm": Application.RS256_ALGORITHM, "skip_authorization": False}
    Application.objects.create(
        client_id=PUBLIC_CLIENT_ID,
        name="kontext-cli (public, code + PKCE)",
        client_type=Application.CLIENT_PUBLIC,
        authorization_grant_type=Application.GRANT_AUTHORIZATION_CODE,
        redirect_uris=REDIRECT_URI,
        **common,
    )
    # One DOT application has one grant type: the device grant needs its own.
    Application.objects.create(
        client_id=DEVICE_CLIENT_ID,
        name="kontext-device (public, device code)",
        client_type=Application.CLIENT_PUBLIC,
        authorization_grant_type=Application.GRANT_DEVICE_CODE,
        **common,
    )
    Application.objects.create(
        client_id=CONFIDENTIAL_CLIENT_ID,
        client_secret=CONFIDENTIAL_CLIENT_SECRET,
        name="kontext-confidential (secret, code + PKCE)",
        client_type=Application.CLIENT_CONFIDENTIAL,
        authorization_grant_type=Application.GRANT_AUTHORIZATION_CODE,
        redirect_uris=REDIRECT_URI,
        **common,
    )


def main():
    if sys.argv[1:] == ["--prepare-template"]:
        prepare_template(os.environ["DOT_TEMPLATE_DB"])
        return
    port = int(os.environ.get("PORT", "0"))
    db = os.environ["DOT_DB"]
    template = os.environ.get("DOT_TEMPLATE_DB") or None
    threading.Thread(target=exit_with_parent, daemon=True).start()

    # Bind first: the issuer must carry the real port, which settings.py reads.
    sock = bind(port)
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    os.environ["DOT_BASE_URL"] = base
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "kontext_dot.settings")

    import django

    django.setup()
    prepare_database(db, template)
    create_clients()

    from django.core.wsgi import get_wsgi_application
    from waitress.server import create_server

    server = create_server(get_wsgi_application(), sockets=[sock], threads=8, clear_untrusted_proxy_headers=True)
    print(f"READY {base}/o", flush=True)
    server.run()


if __name__ == "__main__":
    main()
