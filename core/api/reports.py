"""GET /api/reports/timesheet/: the timesheet (core.reports) as JSON, paginated."""

from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import serializers
from rest_framework.generics import ListAPIView
from rest_framework.pagination import LimitOffsetPagination
from rest_framework.permissions import BasePermission, IsAuthenticated
from rest_framework.response import Response

from core.reports import timesheet_build


class BoundedPagination(LimitOffsetPagination):
    """?limit= and ?offset=, with a limit no larger than max_limit: a larger one
    is served as max_limit rather than passed to the database, where a number
    past its integer range would fail the request."""

    max_limit = 1000


class CanViewTimesheet(BasePermission):
    """core.view_timesheet: the permission of the timesheet, in the API and the admin."""

    def has_permission(self, request, view):
        return request.user.has_perm("core.view_timesheet")


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


class TimesheetView(ListAPIView):
    """Per employee over a period: days worked, worked time, late clock-ins,
    early clock-outs, missing clock-outs, outlier and manual days.

    Needs core.view_timesheet.
    """

    permission_classes = [IsAuthenticated, CanViewTimesheet]
    pagination_class = BoundedPagination
    serializer_class = TimesheetRowSerializer
    # The parameters are parsed by TimesheetQuerySerializer, not a filter backend.
    filter_backends = []
    # ?format=csv: add the CSV renderer to renderer_classes; see list().

    def list(self, request, *args, **kwargs):
        if getattr(request.accepted_renderer, "format", None) == "csv":
            # Every row of the period, not a page: an iterable of flat dicts
            # with the JSON's keys, read in chunks as the renderer consumes it.
            return Response(self.get_queryset())
        return super().list(request, *args, **kwargs)

    def get_queryset(self):
        query = TimesheetQuerySerializer(data=self.request.query_params)
        query.is_valid(raise_exception=True)
        params = query.validated_data
        user_id = params.get("user_id")
        return timesheet_build(
            start_date=params["start_date"],
            end_date=params["end_date"],
            user_ids=None if user_id is None else [user_id],
        )

    @extend_schema(
        operation_id="reports_timesheet",
        parameters=[TimesheetQuerySerializer],
        responses={
            200: TimesheetRowSerializer(many=True),
            400: OpenApiResponse(
                description="A parameter is missing or invalid; the body names it, e.g. "
                '{"start_date": ["This field is required."]}.'
            ),
            403: OpenApiResponse(description="Not logged in, or no core.view_timesheet."),
        },
    )
    def get(self, request, *args, **kwargs):
        return super().get(request, *args, **kwargs)
