"""One exception handler: the stage's errors as DRF-shaped answers.

- a device another worker holds (DeviceBusy: a poll in progress, nothing was
  sent to it): 409, when to try again;
- a device that did not answer in time (DeviceTimeout): 504, its message;
- any other device failure (DeviceError): 502, its message;
- users that do not fit a device (DeviceUserInvalid): 400, per field;
- a pushing clock that cannot take commands yet (ClockNotReady): 409, why;
- everything else as DRF answers it (400 for bad input, 404 for unknown ids).
"""

from rest_framework import status
from rest_framework.exceptions import ValidationError
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from core.device_users import ClockNotReady, DeviceUserInvalid
from core.ingest import DeviceBusy
from core.zk.client import DeviceError, DeviceTimeout


def device_error_status(*, timed_out: bool, busy: bool = False) -> int:
    if busy:
        return status.HTTP_409_CONFLICT
    return status.HTTP_504_GATEWAY_TIMEOUT if timed_out else status.HTTP_502_BAD_GATEWAY


def exception_handler(exc, context):
    if isinstance(exc, DeviceError):
        return Response(
            {"detail": str(exc)},
            status=device_error_status(
                timed_out=isinstance(exc, DeviceTimeout), busy=isinstance(exc, DeviceBusy)
            ),
        )
    if isinstance(exc, ClockNotReady):
        return Response({"detail": str(exc)}, status=status.HTTP_409_CONFLICT)
    if isinstance(exc, DeviceUserInvalid):
        exc = ValidationError(exc.errors)
    return drf_exception_handler(exc, context)
