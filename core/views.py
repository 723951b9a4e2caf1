"""The REST API lives in core.api (docs/api.md); the pull feed of changes is
ProcessedAttendanceViewSet.changes in core.api.views.attendance."""
