"""URLs of the django-oauth-toolkit test server. TEST FIXTURE ONLY.

DOT lives under `/o/` (issuer `http://127.0.0.1:PORT/o`). Its RFC 8414 metadata is
also mounted at the root, at the path-inserted location
`/.well-known/oauth-authorization-server/o`, the only place that lists the
revocation endpoint: DOT's OpenID Connect document does not.
"""

from django.urls import include, path
from oauth2_provider import views as oauth2_views

from . import views

urlpatterns = [
    path("o/", include("oauth2_provider.urls", namespace="oauth2_provider")),
    path(
        ".well-known/oauth-authorization-server/<path:issuer_path>",
        oauth2_views.OAuthServerMetadataView.as_view(),
    ),
    path("accounts/login/", views.login),
    path("test/mint", views.mint),
    path("test/stats", views.stats_view),
    path("test/revoke-grant", views.revoke_grant),
    path("test/active", views.active),
]
