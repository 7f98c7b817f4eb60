"""The always-accept login page and the test-only routes. TEST FIXTURE ONLY, never deploy.

- `GET|POST /accounts/login/`: a login form that accepts any name and password
  (like oidc-provider's `findAccount` in tests/idp), creating the user on first use.
- `POST /test/mint` (`client_id`, `scope`, `sub`): a refresh-token family without a
  login, answered as an RFC 6749 §5.1 token response.
- `GET /test/stats`: the token endpoint counters (kontext_dot.stats).
- `POST /test/revoke-grant` (`client_id`, `sub`): deletes every refresh and access
  token of that user and client, as an administrator deleting them would.
- `POST /test/active` (`token`): whether DOT would accept this access token now,
  or this refresh token at the token endpoint. (DOT's RFC 7662 endpoint only
  knows access tokens.)
"""

import datetime
import uuid

from django.contrib.auth import get_user_model
from django.contrib.auth import login as django_login
from django.http import HttpResponse, HttpResponseRedirect, JsonResponse
from django.middleware.csrf import get_token
from django.utils import timezone
from django.utils.html import escape
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_http_methods, require_POST
from oauthlib.common import generate_token

from oauth2_provider.models import get_access_token_model, get_application_model, get_refresh_token_model
from oauth2_provider.settings import oauth2_settings

from . import stats

LOGIN_PAGE = """<!DOCTYPE html>
<html><head><title>Sign in (test fixture)</title></head>
<body><h1>Sign in</h1>
<form method="post" action="/accounts/login/">
<input type="hidden" name="csrfmiddlewaretoken" value="{csrf}">
<input type="hidden" name="next" value="{next}">
<input type="text" name="login" required>
<input type="password" name="password">
<button type="submit">Sign in</button>
</form></body></html>
"""


def _safe_next(target):
    """Only same-origin paths are followed after login."""
    if target.startswith("/") and not target.startswith("//"):
        return target
    return "/"


@require_http_methods(["GET", "POST"])
def login(request):
    """Accepts any login name; the password is ignored."""
    if request.method == "GET":
        html = LOGIN_PAGE.format(
            csrf=escape(get_token(request)),
            next=escape(_safe_next(request.GET.get("next", "/"))),
        )
        return HttpResponse(html, content_type="text/html; charset=utf-8")
    name = request.POST.get("login", "").strip() or "test-user"
    user, _ = get_user_model().objects.get_or_create(username=name)
    django_login(request, user, backend="django.contrib.auth.backends.ModelBackend")
    return HttpResponseRedirect(_safe_next(request.POST.get("next", "/")))


@csrf_exempt
@require_POST
def mint(request):
    """A new token family for `client_id` and user `sub` (created if needed)."""
    client_id = request.POST.get("client_id", "kontext-cli")
    scope = request.POST.get("scope", "read write")
    sub = request.POST.get("sub", "test-user")
    try:
        application = get_application_model().objects.get(client_id=client_id)
    except get_application_model().DoesNotExist:
        return JsonResponse(
            {"error": "invalid_client", "error_description": f"unknown client {client_id}"}, status=400
        )
    user, _ = get_user_model().objects.get_or_create(username=sub)
    ttl = oauth2_settings.ACCESS_TOKEN_EXPIRE_SECONDS
    access = get_access_token_model().objects.create(
        user=user,
        application=application,
        token=generate_token(),
        expires=timezone.now() + datetime.timedelta(seconds=ttl),
        scope=scope,
    )
    refresh = get_refresh_token_model().objects.create(
        user=user,
        application=application,
        token=generate_token(),
        access_token=access,
        token_family=uuid.uuid4(),
    )
    response = JsonResponse(
        {
            "access_token": access.token,
            "token_type": "Bearer",
            "expires_in": ttl,
            "refresh_token": refresh.token,
            "scope": scope,
        }
    )
    response["Cache-Control"] = "no-store"
    return response


@require_GET
def stats_view(request):
    response = JsonResponse(stats.snapshot())
    response["Cache-Control"] = "no-store"
    return response


@csrf_exempt
@require_POST
def revoke_grant(request):
    """Deletes every token of (`client_id`, `sub`), as an administrator would."""
    client_id = request.POST.get("client_id", "")
    sub = request.POST.get("sub", "test-user")
    filters = {"application__client_id": client_id, "user__username": sub}
    refresh_deleted, _ = get_refresh_token_model().objects.filter(**filters).delete()
    access_deleted, _ = get_access_token_model().objects.filter(**filters).delete()
    return JsonResponse({"refresh_tokens": refresh_deleted, "access_tokens": access_deleted})


@csrf_exempt
@require_POST
def active(request):
    """`{"active": bool, "kind": "access" | "refresh" | null}` for `token`."""
    key = stats.checksum(request.POST.get("token", ""))
    access = get_access_token_model().objects.filter(token_checksum=key).first()
    if access is not None:
        return JsonResponse({"active": not access.is_expired(), "kind": "access"})
    refresh = get_refresh_token_model().objects.filter(token_checksum=key).first()
    if refresh is not None:
        # A rotated or revoked refresh token keeps its row with `revoked` set; one
        # whose access token was swept by reuse protection is an orphan DOT refuses.
        usable = refresh.revoked is None and refresh.access_token_id is not None
        return JsonResponse({"active": usable, "kind": "refresh"})
    return JsonResponse({"active": False, "kind": None})
