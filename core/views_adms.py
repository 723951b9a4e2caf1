"""The /iclock/ endpoints ZKTeco clocks call when they push (core.adms).

Thin: each view reads the query string and the raw body, calls one function
of core.adms and writes its answer as the firmware wants it: 200,
`text/plain`, a GMT `Date` (the clock sets its time from it) and a
`Content-Length`. No session, no CSRF token (a clock has neither), no
redirect. An error answer never contains the letters OK, which the clock
reads as success.
"""

from django.conf import settings
from django.db import DatabaseError
from django.http import HttpRequest, HttpResponse
from django.utils.http import http_date
from django.views.decorators.csrf import csrf_exempt

from core import adms

# Bodies over the limit are read this far at most, so that the clock gets the
# 413 instead of a reset connection, without reading an endless body.
DRAIN_FACTOR = 4


def _reply(text: str, status: int = 200) -> HttpResponse:
    body = text.encode()
    response = HttpResponse(body, status=status, content_type="text/plain")
    response["Date"] = http_date()
    response["Content-Length"] = str(len(body))
    return response


def _refuse(status: int, message: str) -> HttpResponse:
    return _reply(adms.refusal_text(message) + "\n", status)


def _body(request: HttpRequest) -> bytes | None:
    """The raw body, or None when it is over ADMS_MAX_BODY_BYTES. Read from the
    stream: request.body would refuse anything over DATA_UPLOAD_MAX_MEMORY_SIZE."""
    limit = settings.ADMS_MAX_BODY_BYTES
    body = request.read(limit + 1)
    if len(body) <= limit:
        return body
    for _ in range(DRAIN_FACTOR):
        if not request.read(limit):
            break
    return None


def _params(request: HttpRequest) -> dict[str, str]:
    return {key: request.GET.get(key, "") for key in request.GET}


def _serial(request: HttpRequest) -> str | None:
    return request.GET.get("SN") or request.GET.get("sn")


def _handle(request: HttpRequest, work) -> HttpResponse:
    try:
        device = adms.device_contact(
            serial=_serial(request), address=request.META.get("REMOTE_ADDR", "")
        )
        return work(device)
    except adms.AdmsError as exc:
        return _refuse(exc.status, str(exc))
    except DatabaseError:
        # The clock keeps what it sent and tries again after ErrorDelay.
        adms.logger.exception(
            "Push request from serial %r failed in the database", _serial(request)
        )
        return _refuse(503, "The database is unavailable; send again later.")


@csrf_exempt
def cdata(request: HttpRequest) -> HttpResponse:
    """GET: the handshake. POST: an upload (ATTLOG, OPERLOG, any other table)."""
    if request.method == "POST":
        body = _body(request)
        if body is None:
            return _refuse(
                413,
                f"The body is larger than {settings.ADMS_MAX_BODY_BYTES} bytes (ADMS_MAX_BODY_BYTES).",
            )

        def upload(device):
            result = adms.device_upload(
                device=device,
                table=request.GET.get("table", ""),
                params=_params(request),
                body=body,
            )
            return _reply(result.reply)

        return _handle(request, upload)
    if request.method in ("GET", "HEAD"):
        legacy = not request.GET.get("pushver")
        return _handle(
            request, lambda device: _reply(adms.device_handshake(device=device, legacy=legacy))
        )
    return _refuse(405, "Use GET for the handshake and POST for uploads.")


@csrf_exempt
def getrequest(request: HttpRequest) -> HttpResponse:
    """The clock's poll for commands, with its counts (INFO): commands or OK."""
    info = request.GET.get("INFO")
    return _handle(
        request, lambda device: _reply(adms.device_poll_commands(device=device, info=info))
    )


@csrf_exempt
def devicecmd(request: HttpRequest) -> HttpResponse:
    """The results of commands, several in one body."""
    if request.method != "POST":
        return _refuse(405, "Post command results.")
    body = _body(request)
    if body is None:
        return _refuse(
            413,
            f"The body is larger than {settings.ADMS_MAX_BODY_BYTES} bytes (ADMS_MAX_BODY_BYTES).",
        )

    def record(device):
        adms.device_record_results(device=device, body=body)
        return _reply("OK")

    return _handle(request, record)


@csrf_exempt
def ping(request: HttpRequest) -> HttpResponse:
    """A heartbeat during long uploads."""
    return _handle(
        request, lambda device: _reply("OK" if device.enabled else adms.UNKNOWN_DEVICE + "\n")
    )
