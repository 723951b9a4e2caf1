"""What the API's views share: reading ?wait=, and the error answers the schema documents."""

from drf_spectacular.utils import OpenApiParameter, OpenApiResponse
from rest_framework.exceptions import ValidationError

from core.api.serializers import DeviceErrorSerializer, ErrorSerializer

WAIT = OpenApiParameter(
    "wait",
    bool,
    description="true: run now and answer the result (502/504 when the device fails, 409 "
    "when a poll of it is in progress); "
    "false (default): queue a task and answer 202 with its id.",
)

DEVICE_ID = OpenApiParameter("device_pk", int, OpenApiParameter.PATH, description="Device id.")

BAD_REQUEST = OpenApiResponse(
    description="Bad input: each offending parameter or field with what was wrong."
)
UNAUTHENTICATED = OpenApiResponse(ErrorSerializer, description="Not logged in.")
FORBIDDEN = OpenApiResponse(ErrorSerializer, description="The permission this needs is missing.")
NOT_FOUND = OpenApiResponse(ErrorSerializer, description="No such id.")
DEVICE_FAILED = OpenApiResponse(
    DeviceErrorSerializer, description="The device failed or refused: its error says what."
)
DEVICE_TIMEOUT = OpenApiResponse(
    DeviceErrorSerializer, description="The device did not answer in time."
)
DEVICE_BUSY_TEXT = (
    "The device is busy: a poll of it (or another session with it) is in progress, and "
    "nothing was sent to it; the error says in how many seconds to try again."
)
DEVICE_BUSY = OpenApiResponse(DeviceErrorSerializer, description=DEVICE_BUSY_TEXT)

THROTTLED = OpenApiResponse(
    ErrorSerializer, description="Too many requests (API_THROTTLE_RATE): wait and retry."
)

READ_ERRORS = {401: UNAUTHENTICATED, 403: FORBIDDEN, 429: THROTTLED}
LIST_ERRORS = {400: BAD_REQUEST, **READ_ERRORS}
DETAIL_ERRORS = {**READ_ERRORS, 404: NOT_FOUND}
WRITE_ERRORS = {400: BAD_REQUEST, **DETAIL_ERRORS}
DEVICE_ERRORS = {409: DEVICE_BUSY, 502: DEVICE_FAILED, 504: DEVICE_TIMEOUT}


def wait_requested(request) -> bool:
    value = request.query_params.get("wait", "false").strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no", ""):
        return False
    raise ValidationError({"wait": f"true or false, not {value!r}."})
