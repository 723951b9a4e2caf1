"""GET /api/reports/timesheet/: the timesheet (core.reports) as JSON, paginated,
or with ?format=csv every row of the period as a streamed CSV download."""

from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import mixins, serializers, viewsets
from rest_framework.renderers import BrowsableAPIRenderer, JSONRenderer

from core.api.csv import CSVRenderer
from core.api.views.common import LIST_ERRORS
from core.csv_export import csv_response
from core.reports import TIMESHEET_COLUMNS, timesheet_build

TIMESHEET_PERMS = ["core.view_timesheet"]


class TimesheetQuerySerializer(serializers.Serializer):
    start_date = serializers.DateField(help_text="First day of the period (YYYY-MM-DD).")
    end_date = serializers.DateField(
        help_text="Last day of the period (YYYY-MM-DD), included; not before start_date."
    )
    user_id = serializers.CharField(
        required=False, max_length=24, help_text="Only this employee (the user ID on the clocks)."
    )

    def validate(self, attrs):
        if attrs["end_date"] < attrs["start_date"]:
            raise serializers.ValidationError({"end_date": "Must not be before start_date."})
        return attrs


class TimesheetRowSerializer(serializers.Serializer):
    user_id = serializers.CharField()
    name = serializers.CharField(help_text="The employee's name; empty when unknown.")
    days_worked = serializers.IntegerField(help_text="Days with a clock-in.")
    worked_hours = serializers.FloatField(help_text="Total worked time in hours (2 decimals).")
    worked = serializers.CharField(help_text="Total worked time as hours:minutes, e.g. 41:30.")
    late_clock_ins = serializers.IntegerField(
        help_text="Days clocked in later than the start time plus LATE_CLOCK_IN_MINUTES."
    )
    early_clock_outs = serializers.IntegerField(
        help_text="Days clocked out earlier than the end time less EARLY_CLOCK_OUT_MINUTES."
    )
    missing_clock_outs = serializers.IntegerField(help_text="Days with a clock-in only.")
    outlier_days = serializers.IntegerField(help_text="Days flagged as outliers for any reason.")
    manual_days = serializers.IntegerField(help_text="Days corrected by HR.")


class TimesheetViewSet(mixins.ListModelMixin, viewsets.GenericViewSet):
    """Per employee over a period: days worked, worked time, late clock-ins,
    early clock-outs, missing clock-outs, outlier and manual days.

    Needs core.view_timesheet.
    """

    action_permissions = {"list": TIMESHEET_PERMS}
    serializer_class = TimesheetRowSerializer
    renderer_classes = [JSONRenderer, BrowsableAPIRenderer, CSVRenderer]
    # The parameters are parsed by TimesheetQuerySerializer, not a filter backend.
    filter_backends = []

    def _params(self) -> dict:
        query = TimesheetQuerySerializer(data=self.request.query_params)
        query.is_valid(raise_exception=True)
        return query.validated_data

    def get_queryset(self):
        params = self._params()
        user_id = params.get("user_id")
        return timesheet_build(
            start_date=params["start_date"],
            end_date=params["end_date"],
            user_ids=None if user_id is None else [user_id],
        )

    @extend_schema(
        operation_id="reports_timesheet",
        parameters=[
            TimesheetQuerySerializer,
            OpenApiParameter(
                "format",
                str,
                enum=["json", "csv"],
                description="csv: every employee of the period (not a page) as a streamed "
                "CSV download, with a header row and the JSON's field names as columns.",
            ),
        ],
        responses={200: TimesheetRowSerializer(many=True), **LIST_ERRORS},
    )
    def list(self, request, *args, **kwargs):
        if request.accepted_renderer.format == CSVRenderer.format:
            # Every row of the period, not a page: TimesheetRows reads them in
            # chunks as the response is streamed.
            rows = self.get_queryset()
            params = self._params()
            return csv_response(
                columns=TIMESHEET_COLUMNS,
                rows=rows,
                filename=f"timesheet_{params['start_date']}_{params['end_date']}",
            )
        return super().list(request, *args, **kwargs)
