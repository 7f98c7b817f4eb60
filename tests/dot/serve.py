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
#      DOT_DB (sqlite file to create; required), DOT_TEMPLATE_DB (optional: an
#      already migrated database to copy instead of migrating, created when absent);
#    - prints exactly one line `READY http://127.0.0.1:PORT/o` (the issuer) on stdout
#      once it accepts connections;
#    - exits when its stdin closes, so a killed test run leaves no orphan behind.
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


def prepare_database(db, template):
    """Copies the migrated template, or migrates `db` (and saves it as the template)."""
    from django.core.management import call_command
    from django.db import connections

    if template and os.path.isfile(template):
        shutil.copyfile(template, db)
        # A no-op when the template is current; catches a stale one.
        call_command("migrate", verbosity=0, interactive=False)
        return
    call_command("migrate", verbosity=0, interactive=False)
    if template:
        connections.close_all()
        partial = f"{template}.{os.getpid()}.tmp"
        shutil.copyfile(db, partial)
        os.replace(partial, template)


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
