"""Logins for scripts: a DRF token, or a JWT pair. Both limited by LoginThrottle."""

from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import serializers
from rest_framework.authtoken.views import ObtainAuthToken
from rest_framework.permissions import AllowAny
from rest_framework_simplejwt.views import TokenObtainPairView, TokenRefreshView

from core.api.throttling import LoginThrottle


class TokenSerializer(serializers.Serializer):
    token = serializers.CharField()


class TokenView(ObtainAuthToken):
    """POST username and password: {"token": "..."}, for `Authorization: Token ...`."""

    permission_classes = [AllowAny]
    throttle_classes = [LoginThrottle]

    @extend_schema(
        responses={
            200: TokenSerializer,
            400: OpenApiResponse(description="Wrong username or password."),
            429: OpenApiResponse(description="Too many attempts: API_AUTH_THROTTLE_RATE."),
        }
    )
    def post(self, request, *args, **kwargs):
        return super().post(request, *args, **kwargs)


class JWTView(TokenObtainPairView):
    throttle_classes = [LoginThrottle]


class JWTRefreshView(TokenRefreshView):
    throttle_classes = [LoginThrottle]
