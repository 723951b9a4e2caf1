"""Logins for scripts: a DRF token, or a JWT pair. Both limited by LoginThrottle."""

from drf_spectacular.utils import OpenApiResponse, extend_schema, extend_schema_view
from rest_framework import serializers
from rest_framework.authtoken.views import ObtainAuthToken
from rest_framework.permissions import AllowAny
from rest_framework_simplejwt.serializers import TokenObtainPairSerializer, TokenRefreshSerializer
from rest_framework_simplejwt.views import TokenObtainPairView, TokenRefreshView

from core.api.throttling import LoginThrottle

LOGIN_THROTTLED = OpenApiResponse(description="Too many attempts: API_AUTH_THROTTLE_RATE.")


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
            429: LOGIN_THROTTLED,
        }
    )
    def post(self, request, *args, **kwargs):
        return super().post(request, *args, **kwargs)


@extend_schema_view(
    post=extend_schema(
        responses={
            200: TokenObtainPairSerializer,
            400: OpenApiResponse(description="username or password missing."),
            401: OpenApiResponse(description="Wrong username or password."),
            429: LOGIN_THROTTLED,
        }
    )
)
class JWTView(TokenObtainPairView):
    """POST username and password: {"access": "...", "refresh": "..."}."""

    throttle_classes = [LoginThrottle]


@extend_schema_view(
    post=extend_schema(
        responses={
            200: TokenRefreshSerializer,
            400: OpenApiResponse(description="refresh missing."),
            401: OpenApiResponse(description="The refresh token is invalid or expired."),
            429: LOGIN_THROTTLED,
        }
    )
)
class JWTRefreshView(TokenRefreshView):
    """POST {"refresh": "..."}: a new access token."""

    throttle_classes = [LoginThrottle]
