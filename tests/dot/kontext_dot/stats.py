"""Counters of what the token endpoint saw, served at `GET /test/stats`. TEST FIXTURE ONLY.

Tests count refreshes at the IdP itself rather than trust the broker's own
counters. A *replay* is a `refresh_token` grant presenting a refresh token that
DOT had already rotated or revoked: with reuse protection and no grace period,
that revokes the whole token family, so a correct broker never sends one.
"""

import hashlib
import threading

from django.http import QueryDict
from oauth2_provider.models import get_access_token_model, get_refresh_token_model

TOKEN_PATH = "/o/token/"

_lock = threading.Lock()
_stats = {
    "refresh_token_grants": 0,
    "refresh_token_grant_errors": 0,
    "refresh_token_replays": 0,
    "access_tokens_deleted_on_rotation": 0,
}


def snapshot():
    """A copy of the counters."""
    with _lock:
        return dict(_stats)


def _bump(name):
    with _lock:
        _stats[name] += 1


def checksum(token):
    """DOT's lookup key for a token (SHA-256 hex of the token)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class RefreshStatsMiddleware:
    """Counts `grant_type=refresh_token` requests, their errors, replays of rotated
    tokens, and old access tokens DOT deleted while rotating."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        if request.method != "POST" or request.path != TOKEN_PATH:
            return self.get_response(request)
        # Read the raw body first: DOT parses it again, and Django allows that
        # only once the body is cached.
        form = QueryDict(request.body)
        if form.get("grant_type") != "refresh_token":
            return self.get_response(request)

        presented = get_refresh_token_model().objects.filter(
            token_checksum=checksum(form.get("refresh_token", ""))
        ).first()
        if presented is not None and presented.revoked is not None:
            _bump("refresh_token_replays")
        old_access_id = presented.access_token_id if presented is not None else None

        response = self.get_response(request)

        _bump("refresh_token_grants")
        if response.status_code != 200:
            _bump("refresh_token_grant_errors")
        elif old_access_id is not None:
            if not get_access_token_model().objects.filter(pk=old_access_id).exists():
                _bump("access_tokens_deleted_on_rotation")
        return response
