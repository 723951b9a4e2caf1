"""The REST API: so far only the pull feed of daily records (docs/crm-contract.md)."""

from rest_framework.exceptions import APIException, ValidationError
from rest_framework.permissions import BasePermission, IsAdminUser
from rest_framework.response import Response
from rest_framework.views import APIView

from core.crm import FEED_MAX_LIMIT, CursorExpired, InvalidCursor, crm_changes


class Gone(APIException):
    status_code = 410
    default_code = "cursor_expired"


class CanViewDailyAttendance(BasePermission):
    def has_permission(self, request, view):
        return request.user.has_perm("core.view_processedattendance")


class ProcessedAttendanceChanges(APIView):
    """GET ?cursor=&limit=: the days changed since the cursor, oldest change first
    (400 for a cursor the feed did not hand out, 410 for one past its retention)."""

    permission_classes = [IsAdminUser, CanViewDailyAttendance]

    def get(self, request):
        limit = request.query_params.get("limit", "100")
        if not limit.isdigit() or not 1 <= int(limit) <= FEED_MAX_LIMIT:
            raise ValidationError({"limit": f"A whole number from 1 to {FEED_MAX_LIMIT}."})
        try:
            page = crm_changes(cursor=request.query_params.get("cursor") or None, limit=int(limit))
        except InvalidCursor as exc:
            raise ValidationError({"cursor": str(exc)}) from exc
        except CursorExpired as exc:
            raise Gone({"cursor": str(exc)}) from exc
        return Response(
            {"results": page.records, "next_cursor": page.next_cursor, "has_more": page.has_more}
        )
