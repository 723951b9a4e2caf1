"""/api/raw-attendance/ and /api/processed-attendance/: punches and daily records."""

import dataclasses

from django_filters.rest_framework import DjangoFilterBackend
from drf_spectacular.utils import (
    OpenApiParameter,
    OpenApiResponse,
    extend_schema,
    extend_schema_view,
)
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import APIException, ValidationError
from rest_framework.renderers import BrowsableAPIRenderer, JSONRenderer
from rest_framework.response import Response

from core import tasks
from core.api.csv import CSVExportMixin, CSVRenderer
from core.api.filters import (
    ProcessedAttendanceFilter,
    RawAttendanceFilter,
    StrictOrderingFilter,
)
from core.api.serializers import (
    ChangesPageSerializer,
    CorrectionSerializer,
    ProcessedAttendanceSerializer,
    ProcessingResultSerializer,
    RawAttendanceSerializer,
    SyncRequestSerializer,
    TaskQueuedSerializer,
)
from core.api.views.common import (
    DETAIL_ERRORS,
    LIST_ERRORS,
    WAIT,
    WRITE_ERRORS,
    wait_requested,
)
from core.audit import audit_changes
from core.crm import FEED_MAX_LIMIT, CursorExpired, InvalidCursor, crm_changes, crm_resend
from core.models import ProcessedAttendance, RawAttendance
from core.processing import attendance_edit, attendance_process

CSV_FORMAT = OpenApiParameter(
    "format",
    str,
    enum=["json", "csv"],
    description="csv: every matching row (not a page) as a streamed CSV download, with a "
    "header row and the JSON's field names as columns.",
)
RENDERERS = [JSONRenderer, BrowsableAPIRenderer, CSVRenderer]


class CursorGone(APIException):
    """A feed cursor older than CRM_FEED_RETENTION_DAYS: the consumer starts again."""

    status_code = status.HTTP_410_GONE
    default_code = "cursor_expired"


CURSOR_GONE = OpenApiResponse(
    description='The cursor is past the feed\'s retention: {"cursor": what to do}.'
)


@extend_schema_view(
    list=extend_schema(
        parameters=[CSV_FORMAT],
        responses={200: RawAttendanceSerializer(many=True), **LIST_ERRORS},
        description="Punches as the devices recorded them, times in UTC (local_time in the "
        "device's zone). start_date and end_date are local dates in tz, by default each "
        "punch's device's zone.",
    ),
    retrieve=extend_schema(responses={200: RawAttendanceSerializer, **DETAIL_ERRORS}),
)
class RawAttendanceViewSet(CSVExportMixin, viewsets.ReadOnlyModelViewSet):
    """Punches as the devices recorded them; read-only (they come from the clocks)."""

    queryset = RawAttendance.objects.select_related("device").order_by("-timestamp", "-id")
    serializer_class = RawAttendanceSerializer
    renderer_classes = RENDERERS
    filter_backends = [DjangoFilterBackend, StrictOrderingFilter]
    filterset_class = RawAttendanceFilter
    ordering_fields = ["timestamp", "user_id", "device", "id", "received_at"]
    csv_filename = "raw-attendance"


_SYNC_PERMS = ["core.view_processedattendance", "core.resend_processedattendance"]
_CHANGE_PERMS = ["core.view_processedattendance", "core.change_processedattendance"]


@extend_schema_view(
    list=extend_schema(
        parameters=[CSV_FORMAT],
        responses={200: ProcessedAttendanceSerializer(many=True), **LIST_ERRORS},
    ),
    retrieve=extend_schema(responses={200: ProcessedAttendanceSerializer, **DETAIL_ERRORS}),
    unsynced=extend_schema(
        parameters=[CSV_FORMAT],
        responses={200: ProcessedAttendanceSerializer(many=True), **LIST_ERRORS},
        description="Days the CRM does not hold at their latest version (pending, failed, "
        "rejected); the same filters as the list.",
    ),
    outliers=extend_schema(
        parameters=[CSV_FORMAT],
        responses={200: ProcessedAttendanceSerializer(many=True), **LIST_ERRORS},
        description="Days flagged as outliers; the same filters as the list.",
    ),
)
class ProcessedAttendanceViewSet(
    CSVExportMixin,
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    viewsets.GenericViewSet,
):
    """Daily clock-in/clock-out records with their outlier flags and delivery state."""

    queryset = ProcessedAttendance.objects.select_related(
        "employee", "edited_by", "reviewed_by"
    ).order_by("-work_date", "user_id")
    serializer_class = ProcessedAttendanceSerializer
    renderer_classes = RENDERERS
    filter_backends = [DjangoFilterBackend, StrictOrderingFilter]
    filterset_class = ProcessedAttendanceFilter
    ordering_fields = ["work_date", "user_id", "clock_in", "id"]
    csv_filename = "processed-attendance"
    action_permissions = {
        "partial_update": _CHANGE_PERMS,
        "sync": _SYNC_PERMS,
        "process": ["core.view_processedattendance", "core.process_processedattendance"],
        "unsynced": ["core.view_processedattendance"],
        "outliers": ["core.view_processedattendance"],
        "changes": ["core.view_processedattendance"],
    }

    def get_queryset(self):
        queryset = super().get_queryset()
        if self.action == "unsynced":
            return queryset.exclude(sync_state=ProcessedAttendance.SyncState.SYNCED)
        if self.action == "outliers":
            return queryset.filter(is_outlier=True)
        return queryset

    @action(detail=False, methods=["get"])
    def unsynced(self, request):
        return self.list(request)

    @action(detail=False, methods=["get"])
    def outliers(self, request):
        return self.list(request)

    @extend_schema(
        summary="HR's correction of a day",
        request=CorrectionSerializer,
        responses={200: ProcessedAttendanceSerializer, **WRITE_ERRORS},
        description="Sets clock_in and clock_out; marks the day manual (processing never "
        "overwrites it), records who and when, and makes it due for the CRM. Needs "
        "core.change_processedattendance.",
    )
    def partial_update(self, request, pk=None):
        day = self.get_object()
        given = CorrectionSerializer(data=request.data)
        given.is_valid(raise_exception=True)
        try:
            with audit_changes(actor=request.user, action="attendance_edit", ids=[day.pk]):
                day = attendance_edit(record_id=day.pk, user=request.user, **given.validated_data)
        except ValueError as exc:
            raise ValidationError({"clock_out": str(exc)}) from None
        return Response(self.get_serializer(day).data)

    @extend_schema(
        summary="Send due days to the CRM",
        request=SyncRequestSerializer,
        responses={202: TaskQueuedSerializer, **LIST_ERRORS},
        description="Queues a delivery run; with ids, those days are made due again first "
        "(a resend, recorded in the audit log). Needs core.resend_processedattendance.",
    )
    @action(detail=False, methods=["post"], filter_backends=[], pagination_class=None)
    def sync(self, request):
        given = SyncRequestSerializer(data=request.data)
        given.is_valid(raise_exception=True)
        ids = sorted(set(given.validated_data.get("ids") or []))
        if ids:
            found = set(ProcessedAttendance.objects.filter(pk__in=ids).values_list("pk", flat=True))
            unknown = [pk for pk in ids if pk not in found]
            if unknown:
                raise ValidationError({"ids": f"No daily record with id {unknown[:20]}."})
            # Made due here, not in the task, so the audit log records who asked.
            with audit_changes(actor=request.user, action="crm_resend", ids=ids) as ids:
                crm_resend(ids=ids)
        task = tasks.sync_to_crm.delay(None)
        return Response({"task_id": task.id}, status=status.HTTP_202_ACCEPTED)

    @extend_schema(
        summary="Build daily records from the punches stored since the last run",
        request=None,
        parameters=[WAIT],
        responses={200: ProcessingResultSerializer, 202: TaskQueuedSerializer, **LIST_ERRORS},
        description="Queues an incremental processing run (or, with wait=true, runs it and "
        "answers its counts). Idempotent: a run with nothing new changes nothing. Needs "
        "core.process_processedattendance.",
    )
    @action(detail=False, methods=["post"], filter_backends=[], pagination_class=None)
    def process(self, request):
        if not wait_requested(request):
            task = tasks.process_attendance.delay()
            return Response({"task_id": task.id}, status=status.HTTP_202_ACCEPTED)
        return Response(dataclasses.asdict(attendance_process()))

    @extend_schema(
        summary="The pull feed: days changed since a cursor",
        parameters=[
            OpenApiParameter("cursor", str, description="next_cursor of the previous page."),
            OpenApiParameter("limit", int, description=f"1 to {FEED_MAX_LIMIT}; 100 by default."),
        ],
        responses={200: ChangesPageSerializer, **LIST_ERRORS, 410: CURSOR_GONE},
        description=(
            "Oldest change first, in the CRM contract's shape (docs/crm-contract.md): every "
            "version of a day, and a tombstone (deleted: true) for a day processing removed. "
            "410 for a cursor older than CRM_FEED_RETENTION_DAYS: start again without one."
        ),
    )
    @action(detail=False, methods=["get"], filter_backends=[], pagination_class=None)
    def changes(self, request):
        limit = request.query_params.get("limit", "100")
        if not limit.isdigit() or not 1 <= int(limit) <= FEED_MAX_LIMIT:
            raise ValidationError({"limit": f"A whole number from 1 to {FEED_MAX_LIMIT}."})
        try:
            page = crm_changes(cursor=request.query_params.get("cursor") or None, limit=int(limit))
        except InvalidCursor as exc:
            raise ValidationError({"cursor": str(exc)}) from exc
        except CursorExpired as exc:
            raise CursorGone({"cursor": str(exc)}) from exc
        return Response(
            {"results": page.records, "next_cursor": page.next_cursor, "has_more": page.has_more}
        )
