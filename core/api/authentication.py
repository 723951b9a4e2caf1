from django.conf import settings
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework.authentication import BasicAuthentication


class OptionalBasicAuthentication(BasicAuthentication):
    """HTTP Basic, only while API_BASIC_AUTH is on: it sends the password with
    every request, so it stays off unless an operator behind TLS wants it."""

    def authenticate(self, request):
        if not settings.API_BASIC_AUTH:
            return None
        return super().authenticate(request)


class OptionalBasicScheme(OpenApiAuthenticationExtension):
    """How the schema describes it (drf-spectacular finds extensions by import)."""

    target_class = OptionalBasicAuthentication
    name = "basicAuth"

    def get_security_definition(self, auto_schema):
        return {
            "type": "http",
            "scheme": "basic",
            "description": "Only when the API_BASIC_AUTH setting is on.",
        }
