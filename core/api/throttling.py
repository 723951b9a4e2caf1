"""Request limits read from the settings at each request, so a changed rate
applies without re-importing DRF (API_THROTTLE_RATE, API_ANON_THROTTLE_RATE,
API_AUTH_THROTTLE_RATE, API_NUM_PROXIES). Counts are kept in Django's cache."""

from django.conf import settings
from rest_framework.throttling import AnonRateThrottle, SimpleRateThrottle, UserRateThrottle


def client_address(request) -> str:
    """The address a request is counted under: the connection's own, or behind
    API_NUM_PROXIES proxies the one the outermost of them saw, the entry it
    added to X-Forwarded-For. Entries a client sent itself come before those
    and are never read: without a proxy, or with too few, DRF would count each
    made-up header as a new client (and a password guesser could send one per try)."""
    proxies = settings.API_NUM_PROXIES
    forwarded = request.META.get("HTTP_X_FORWARDED_FOR")
    if not proxies or not forwarded:
        return request.META.get("REMOTE_ADDR", "")
    addresses = forwarded.split(",")
    return addresses[-min(proxies, len(addresses))].strip()


class _ByClientAddress:
    def get_ident(self, request) -> str:
        return client_address(request)


class UserThrottle(_ByClientAddress, UserRateThrottle):
    def get_rate(self) -> str:
        return settings.API_THROTTLE_RATE


class AnonThrottle(_ByClientAddress, AnonRateThrottle):
    def get_rate(self) -> str:
        return settings.API_ANON_THROTTLE_RATE


class LoginThrottle(_ByClientAddress, SimpleRateThrottle):
    """The login endpoints, per client address: a limit on guessing passwords."""

    scope = "auth"

    def get_rate(self) -> str:
        return settings.API_AUTH_THROTTLE_RATE

    def get_cache_key(self, request, view) -> str:
        return self.cache_format % {"scope": self.scope, "ident": self.get_ident(request)}
