"""GET /api/audit-log/: the audit log (core.audit), newest first, filtered and paginated."""

import datetime

from auditlog.models import LogEntry
from django import forms
from django.contrib.contenttypes.models import ContentType
from django_filters import rest_framework as filters
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema, extend_schema_field
from rest_framework import mixins, serializers, viewsets

from core.api.views.common import LIST_ERRORS

ACTIONS = {label: code for code, label in LogEntry.Action.choices}


# The one permission the audit log needs, in the API and the admin.
AUDIT_LOG_PERMS = ["auditlog.view_logentry"]


class ModelLabelField(forms.CharField):
    """An "app_label.model" name, such as core.device, of a model that exists."""

    def clean(self, value):
        value = super().clean(value)
        if not value:
            return None
        app_label, _, model = value.lower().partition(".")
        try:
            return ContentType.objects.get_by_natural_key(app_label, model)
        except ContentType.DoesNotExist:
            raise forms.ValidationError(
                f"{value!r} is not a model; use app_label.model, e.g. core.device."
            ) from None


@extend_schema_field(OpenApiTypes.STR)
class ModelLabelFilter(filters.Filter):
    field_class = ModelLabelField

    def filter(self, qs, value):
        return qs if value is None else qs.filter(content_type=value)


class IdFilter(filters.NumberFilter):
    """A whole-number id: "1.5" and numbers past the column's range are a 400."""

    field_class = forms.IntegerField


class AuditLogFilter(filters.FilterSet):
    actor = IdFilter(
        field_name="actor_id", min_value=1, max_value=2**31 - 1, help_text="The acting user's id."
    )
    actor_username = filters.CharFilter(
        field_name="actor__username", help_text="The acting user's username."
    )
    model = ModelLabelFilter(help_text="The changed object's model, e.g. core.device.")
    object_pk = filters.CharFilter(help_text="The changed object's primary key.")
    action = filters.ChoiceFilter(
        choices=[(label, label) for label in ACTIONS],
        method="filter_action",
        help_text="What the log entry records of the object: create, update, delete.",
    )
    operation = filters.CharFilter(
        field_name="additional_data__action",
        help_text="The named change, e.g. attendance_edit, crm_resend, device_sync_time.",
    )
    start_date = filters.DateFilter(
        method="filter_start", help_text="Entries on or after this day (UTC, YYYY-MM-DD)."
    )
    end_date = filters.DateFilter(
        method="filter_end", help_text="Entries on or before this day (UTC, YYYY-MM-DD)."
    )

    class Meta:
        model = LogEntry
        fields = []

    def filter_action(self, queryset, name, value):
        return queryset.filter(action=ACTIONS[value])

    def filter_start(self, queryset, name, value):
        return queryset.filter(timestamp__gte=_midnight(value))

    def filter_end(self, queryset, name, value):
        return queryset.filter(timestamp__lt=_midnight(value + datetime.timedelta(days=1)))


def _midnight(day: datetime.date) -> datetime.datetime:
    return datetime.datetime.combine(day, datetime.time(), tzinfo=datetime.UTC)


class AuditLogEntrySerializer(serializers.ModelSerializer):
    actor = serializers.SerializerMethodField(help_text="The acting user's username, or null.")
    model = serializers.SerializerMethodField(help_text="app_label.model of the changed object.")
    action = serializers.CharField(source="get_action_display")
    operation = serializers.SerializerMethodField(
        help_text="The named change (attendance_edit, crm_resend, ...); empty for a plain "
        "create, edit or delete."
    )
    changes = serializers.SerializerMethodField(
        help_text="Each changed field with its value before and after: {field: [before, after]}."
    )
    command_id = serializers.SerializerMethodField(
        help_text="A command queued for a pushing clock: its id, to read its result at "
        "/api/devices/{object_pk}/commands/{command_id}/; null for any other change."
    )

    class Meta:
        model = LogEntry
        fields = [
            "id",
            "timestamp",
            "actor_id",
            "actor",
            "model",
            "object_pk",
            "object_repr",
            "action",
            "operation",
            "changes",
            "command_id",
            "remote_addr",
        ]

    @extend_schema_field(OpenApiTypes.STR)
    def get_actor(self, entry):
        return entry.actor.get_username() if entry.actor else None

    def get_model(self, entry) -> str:
        return f"{entry.content_type.app_label}.{entry.content_type.model}"

    def get_operation(self, entry) -> str:
        return (entry.additional_data or {}).get("action", "")

    @extend_schema_field(OpenApiTypes.OBJECT)
    def get_changes(self, entry):
        return entry.changes_dict

    @extend_schema_field(OpenApiTypes.INT)
    def get_command_id(self, entry):
        # One key of the entry's data, not the data: an import's would show its URL.
        return (entry.additional_data or {}).get("command_id")


class AuditLogViewSet(mixins.ListModelMixin, viewsets.GenericViewSet):
    """Every change a person made, newest first. Needs auditlog.view_logentry."""

    action_permissions = {"list": AUDIT_LOG_PERMS}
    serializer_class = AuditLogEntrySerializer
    filter_backends = [filters.DjangoFilterBackend]
    filterset_class = AuditLogFilter
    queryset = LogEntry.objects.select_related("content_type", "actor").order_by(
        "-timestamp", "-id"
    )

    @extend_schema(
        operation_id="audit_log_list",
        responses={200: AuditLogEntrySerializer(many=True), **LIST_ERRORS},
    )
    def list(self, request, *args, **kwargs):
        return super().list(request, *args, **kwargs)
