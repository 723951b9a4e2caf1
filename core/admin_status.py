"""The admin's first page, the HR status page (core.status), and the list
filters its figures link to.

Each filter selects its rows with the same condition core.status counts them
with, so the list behind a figure holds exactly the rows the figure counts.
"""

from django.contrib import admin
from django.utils import timezone

from core import status
from core.models import PunchDelivery

# Which permission shows which part of the page; the change permission also
# shows it, as it shows the list behind it.
SECTION_MODELS = {
    status.PRESENCE: "processedattendance",
    status.REVIEW: "processedattendance",
    status.BACKLOG: "processedattendance",
    status.DEVICES: "device",
    status.PUNCH_BACKLOG: "rawattendance",
    status.PUNCHES_PER_HOUR: "rawattendance",
}


def visible_sections(user) -> set[str]:
    """The parts of the status page this user may see."""
    return {
        section
        for section, model in SECTION_MODELS.items()
        if user.has_perm(f"core.view_{model}") or user.has_perm(f"core.change_{model}")
    }


class BridgeAdminSite(admin.AdminSite):
    """The Django admin, its index page showing the HR status above the models."""

    index_template = "admin/core/status_index.html"

    def index(self, request, extra_context=None):
        sections = visible_sections(request.user)
        context = {"hr_status": status.status_read(sections=sections) if sections else None}
        return super().index(request, {**context, **(extra_context or {})})


# --- The filters behind the figures ------------------------------------------------


class PresenceFilter(admin.SimpleListFilter):
    """Daily attendance: who clocked in today, who is still in (core.status.presence_q)."""

    title = "presence"
    parameter_name = "presence"

    def lookups(self, request, model_admin):
        return list(status.PRESENCE_KINDS.items())

    def queryset(self, request, queryset):
        if self.value() not in status.PRESENCE_KINDS:
            return queryset
        condition = status.presence_q(self.value(), now=timezone.now())
        return status.with_punch_parity(queryset).filter(condition)


class ReviewFilter(admin.SimpleListFilter):
    """Daily attendance waiting for review (core.status.review_q)."""

    title = "waiting for review"
    parameter_name = "review"

    def lookups(self, request, model_admin):
        return list(status.REVIEW_KINDS.items())

    def queryset(self, request, queryset):
        if self.value() not in status.REVIEW_KINDS:
            return queryset
        return queryset.filter(status.review_q(self.value(), now=timezone.now()))


class DeviceStatusFilter(admin.SimpleListFilter):
    """Enabled devices that need a look (core.status.device_q)."""

    title = "needs attention"
    parameter_name = "attention"

    def lookups(self, request, model_admin):
        return list(status.DEVICE_KINDS.items())

    def queryset(self, request, queryset):
        if self.value() not in status.DEVICE_KINDS:
            return queryset
        return queryset.filter(status.device_q(self.value(), now=timezone.now()))


class PunchDeliveryFilter(admin.SimpleListFilter):
    """Raw punches by their delivery to CRM_PUNCHES_URL."""

    title = "delivery to the CRM"
    parameter_name = "delivery"

    def lookups(self, request, model_admin):
        return [
            ("undelivered", "Not delivered yet (pending or failed)"),
            *PunchDelivery.SyncState.choices,
        ]

    def queryset(self, request, queryset):
        value = self.value()
        if value == "undelivered":
            states = [PunchDelivery.SyncState.PENDING, PunchDelivery.SyncState.FAILED]
        elif value in PunchDelivery.SyncState.values:
            states = [value]
        else:
            return queryset
        return queryset.filter(delivery__sync_state__in=states)
