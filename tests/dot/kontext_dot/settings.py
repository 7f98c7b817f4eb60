"""Settings of the django-oauth-toolkit test server. TEST FIXTURE ONLY, never deploy.

Configured like Ory Hydra: refresh tokens rotate on every use, reusing a rotated
one revokes its whole family (no grace period), access tokens are short (env
`DOT_ACCESS_TOKEN_TTL`), PKCE is required, and OpenID Connect signs with an RS256
key generated when the process starts. `serve.py` sets `DOT_BASE_URL` and
`DOT_DB` before Django reads this module.
"""

import os

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa


def _new_rsa_key_pem():
    """A fresh RS256 signing key for this process only (never written to disk)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode("ascii")


BASE_URL = os.environ["DOT_BASE_URL"]
ISSUER = f"{BASE_URL}/o"
ACCESS_TOKEN_TTL = int(os.environ.get("DOT_ACCESS_TOKEN_TTL", "5"))

SECRET_KEY = "kontext-dot-test-fixture-django-key-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1"]
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "oauth2_provider",
    "kontext_dot",
]
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "kontext_dot.stats.RefreshStatsMiddleware",
]
ROOT_URLCONF = "kontext_dot.urls"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {"context_processors": ["django.template.context_processors.request"]},
    }
]
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ["DOT_DB"],
        # waitress serves from several threads; let writers wait for the lock.
        "OPTIONS": {"timeout": 30},
    }
}
# The always-accept login page (kontext_dot.views.login) stands in for a real one.
LOGIN_URL = "/accounts/login/"
# Client secrets are hashed with this; PBKDF2's million rounds would cost about
# a second per confidential-client request on a loaded test machine.
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"stderr": {"class": "logging.StreamHandler"}},
    "loggers": {
        "django.request": {"handlers": ["stderr"], "level": "ERROR"},
        "oauth2_provider": {"handlers": ["stderr"], "level": "WARNING"},
    },
}

OAUTH2_PROVIDER = {
    # Hydra-like rotation: every refresh rotates; a rotated token used again
    # revokes the whole family at once.
    "ROTATE_REFRESH_TOKEN": True,
    "REFRESH_TOKEN_REUSE_PROTECTION": True,
    "REFRESH_TOKEN_GRACE_PERIOD_SECONDS": 0,
    "ACCESS_TOKEN_EXPIRE_SECONDS": ACCESS_TOKEN_TTL,
    "PKCE_REQUIRED": True,
    "OIDC_ENABLED": True,
    "OIDC_RSA_PRIVATE_KEY": _new_rsa_key_pem(),
    "OIDC_ISS_ENDPOINT": ISSUER,
    # Stock scopes (`read write` by default) plus `openid`; an unknown scope
    # such as `offline_access` is `invalid_scope`.
    "SCOPES": {
        "openid": "OpenID Connect",
        "read": "Reading scope",
        "write": "Writing scope",
    },
    "DEFAULT_SCOPES": ["read", "write"],
    # Device flow (RFC 8628): fast polling for tests; the verification pages are
    # DOT's own (`/o/device/`, then the accept/deny page).
    "DEVICE_FLOW_INTERVAL": 1,
    "OAUTH_DEVICE_VERIFICATION_URI": f"{ISSUER}/device/",
    "OAUTH_DEVICE_VERIFICATION_URI_COMPLETE": f"{ISSUER}/device/?user_code={{user_code}}",
}
