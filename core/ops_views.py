"""Operations endpoints: /health/ for monitors and load balancers, /metrics for Prometheus."""

import hmac

from django.conf import settings
from django.http import HttpResponse, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET
from prometheus_client import CONTENT_TYPE_LATEST

from core.health import health_check
from core.metrics import metrics_render


@never_cache
@require_GET
def health(request):
    """GET /health/, open to all: 200 when every check passes, else 503 naming the failing ones."""
    result = health_check()
    response = JsonResponse(result.as_dict(), status=200 if result.ok else 503)
    # A monitor asks every few seconds: a failing check is its answer, not a
    # server error for django.request to log each time.
    response._has_been_logged = True
    return response


@never_cache
@require_GET
def metrics(request):
    """GET /metrics for Prometheus, with Authorization: Bearer METRICS_TOKEN."""
    token = settings.METRICS_TOKEN
    if not token:
        return HttpResponse(
            "Metrics are off: set METRICS_TOKEN and scrape with "
            "Authorization: Bearer <METRICS_TOKEN>.\n",
            status=404,
            content_type="text/plain; charset=utf-8",
        )
    sent = request.headers.get("Authorization", "")
    scheme, _, given = sent.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        given.strip().encode(), token.encode()
    ):
        response = HttpResponse(
            "Send Authorization: Bearer <METRICS_TOKEN> to read the metrics.\n",
            status=401,
            content_type="text/plain; charset=utf-8",
        )
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response
    return HttpResponse(metrics_render(), content_type=CONTENT_TYPE_LATEST)
