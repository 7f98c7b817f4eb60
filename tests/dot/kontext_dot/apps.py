"""The test server's Django app (no models; views, counters and URLs only)."""

from django.apps import AppConfig


class KontextDotConfig(AppConfig):
    name = "kontext_dot"
