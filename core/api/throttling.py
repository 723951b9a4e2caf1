"""Request limits read from the settings at each request, so a changed rate
applies without re-importing DRF (API_THROTTLE_RATE, API_ANON_THROTTLE_RATE,
API_AUTH_THROTTLE_RATE). Counts are kept in Django's cache."""

from django.conf import settings
from rest_framework.throttling import AnonRateThrottle, SimpleRateThrottle, UserRateThrottle


class UserThrottle(UserRateThrottle):
    def get_rate(self) -> str:
        return settings.API_THROTTLE_RATE


class AnonThrottle(AnonRateThrottle):
    def get_rate(self) -> str:
        return settings.API_ANON_THROTTLE_RATE


class LoginThrottle(SimpleRateThrottle):
    """The login endpoints, per client address: a limit on guessing passwords."""

    scope = "auth"

    def get_rate(self) -> str:
        return settings.API_AUTH_THROTTLE_RATE

    def get_cache_key(self, request, view) -> str:
        return self.cache_format % {"scope": self.scope, "ident": self.get_ident(request)}
