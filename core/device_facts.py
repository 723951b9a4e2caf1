"""The facts polls learn about a clock and write on its Device row
(Device.OBSERVED_FIELDS): never set by a person, so read-only in the admin
and the API, and left out of the device's audit log entries.

Names only, with no Django import: settings reads them
(AUDITLOG_INCLUDE_TRACKING_MODELS) before the app registry is ready, where
core.models cannot be imported.
"""

OBSERVED_FIELDS = (
    "serial_number",
    "firmware",
    "platform",
    "device_name",
    "user_count",
    "user_capacity",
    "record_count",
    "record_capacity",
    "clock_drift_seconds",
    "last_poll_at",
    "last_success_at",
    "last_full_download_at",
    "last_error",
    "consecutive_failures",
)
