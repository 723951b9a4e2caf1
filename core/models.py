"""The domain: devices, the punches they record, the employees behind them,
and the daily records built from those punches."""

from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.utils.timezone import now

from core import device_facts


def validate_timezone(value: str) -> None:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValidationError(
            f"{value!r} is not an IANA time zone name (for example Europe/Lisbon)."
        ) from None


def default_device_timezone() -> str:
    return settings.DEVICE_DEFAULT_TIMEZONE


def default_device_timeout() -> int:
    return settings.DEVICE_TIMEOUT_SECONDS


class Device(models.Model):
    # What polls learn about the device and write on its row; never set by a
    # person, so read-only in the admin and the API, and not audited. Named in
    # core.device_facts, where settings reads them too.
    OBSERVED_FIELDS = device_facts.OBSERVED_FIELDS

    class Protocol(models.TextChoices):
        TCP = "tcp", "TCP"
        UDP = "udp", "UDP"

    class Encoding(models.TextChoices):
        # The code page a clock writes user names in: UTF-8 on current
        # firmware, the region's legacy code page on older clocks.
        UTF8 = "utf-8", "UTF-8 (current firmware)"
        CP1252 = "cp1252", "Western European (cp1252)"
        CP1250 = "cp1250", "Central European (cp1250)"
        CP1251 = "cp1251", "Cyrillic (cp1251)"
        CP1253 = "cp1253", "Greek (cp1253)"
        CP1254 = "cp1254", "Turkish (cp1254)"
        CP1255 = "cp1255", "Hebrew (cp1255)"
        CP1256 = "cp1256", "Arabic (cp1256)"
        CP1258 = "cp1258", "Vietnamese (cp1258)"
        CP874 = "cp874", "Thai (cp874)"
        GB18030 = "gb18030", "Chinese, simplified (GB18030, GBK, GB2312)"
        BIG5 = "big5", "Chinese, traditional (Big5)"
        CP932 = "cp932", "Japanese (Shift JIS, cp932)"
        CP949 = "cp949", "Korean (EUC-KR, cp949)"

    # --- what the operator sets ---
    name = models.CharField(max_length=100, unique=True)
    # IPv4 only: ZKTeco clocks and pyzk speak IPv4. Empty for a clock that
    # pushes its punches over HTTP (core.adms): only devices with one are polled.
    ip_address = models.GenericIPAddressField(
        "IP address",
        protocol="IPv4",
        null=True,
        blank=True,
        help_text="Where to poll the clock; leave empty for a clock that pushes (Cloud server).",
    )
    port = models.PositiveIntegerField(
        default=4370, validators=[MinValueValidator(1), MaxValueValidator(65535)]
    )
    protocol = models.CharField(max_length=3, choices=Protocol.choices, default=Protocol.TCP)
    comm_key = models.PositiveIntegerField(
        "comm key",
        default=0,
        validators=[MaxValueValidator(999999)],
        help_text="The device's communication password (Comm Key in its menu); 0 for none.",
    )
    timeout_seconds = models.PositiveIntegerField(
        default=default_device_timeout, validators=[MinValueValidator(1)]
    )
    timezone = models.CharField(
        max_length=64,
        default=default_device_timezone,
        validators=[validate_timezone],
        help_text="IANA zone of the device clock, e.g. Europe/Lisbon.",
    )
    encoding = models.CharField(
        max_length=16,
        choices=Encoding.choices,
        default=Encoding.UTF8,
        help_text="How the clock writes user names; a name that is not valid in it is reported.",
    )
    enabled = models.BooleanField(
        default=True,
        help_text=(
            "Disabled devices are not polled; a disabled clock that pushes is refused and "
            "keeps its records until it is enabled (approved)."
        ),
    )
    # Outlier rule overrides for everyone punching on this device (a warehouse
    # with early shifts); empty means the WORK_START_TIME / WORK_END_TIME settings.
    work_start_time = models.TimeField(null=True, blank=True)
    work_end_time = models.TimeField(null=True, blank=True)

    # --- facts learned from the device at the last successful poll ---
    serial_number = models.CharField(max_length=64, blank=True)
    firmware = models.CharField(max_length=64, blank=True)
    platform = models.CharField(max_length=64, blank=True)
    device_name = models.CharField(max_length=64, blank=True)
    user_count = models.PositiveIntegerField(null=True, blank=True)
    user_capacity = models.PositiveIntegerField(null=True, blank=True)
    record_count = models.PositiveIntegerField(null=True, blank=True)
    record_capacity = models.PositiveIntegerField(null=True, blank=True)
    clock_drift_seconds = models.FloatField(
        null=True, blank=True, help_text="Device clock minus server time at the last poll."
    )

    # --- polling state ---
    last_poll_at = models.DateTimeField(null=True, blank=True)
    last_success_at = models.DateTimeField(null=True, blank=True)
    last_full_download_at = models.DateTimeField(null=True, blank=True)
    last_error = models.TextField(blank=True)
    consecutive_failures = models.PositiveIntegerField(default=0)
    last_record_count = models.PositiveIntegerField(
        null=True, blank=True, help_text="Record count seen at the last successful download."
    )
    last_serial_number = models.CharField(
        max_length=64, blank=True, help_text="Serial number seen at the last successful download."
    )
    # Who may talk to the device right now (core.ingest.device_lease_claim): a
    # poll, a log clear or any other session (core.ingest.device_session) holds
    # it until this moment. Workers on several machines claim it with one
    # conditional UPDATE, so two never talk to one device at once; a worker
    # that dies leaves it to expire.
    poll_lease_until = models.DateTimeField(null=True, blank=True, editable=False)

    # --- push (ADMS, core.adms): a clock that calls /iclock/ itself ---
    # Set at its first contact; a device never seen pushing has none.
    first_seen_at = models.DateTimeField(null=True, blank=True)
    last_seen_at = models.DateTimeField(null=True, blank=True)
    push_address = models.GenericIPAddressField(
        "pushes from", null=True, blank=True, help_text="The address its last request came from."
    )
    # The clock's upload cursors (ZK-encoded times), echoed at its next handshake.
    attlog_stamp = models.CharField("ATTLOG stamp", max_length=20, blank=True, default="")
    operlog_stamp = models.CharField("OPERLOG stamp", max_length=20, blank=True, default="")
    fingerprint_count = models.PositiveIntegerField(null=True, blank=True)
    reported_ip = models.CharField(
        "reported IP address", max_length=45, blank=True, default="", help_text="As the clock says."
    )
    # The options the clock sent with its last INFO result.
    push_options = models.JSONField(default=dict, blank=True)
    newest_record_at = models.DateTimeField(
        null=True, blank=True, help_text="The newest punch the clock has uploaded (UTC)."
    )

    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        constraints = [
            # A pushing clock is found by its serial number: two rows without
            # an address for one serial would split its punches.
            models.UniqueConstraint(
                fields=["serial_number"],
                condition=models.Q(ip_address__isnull=True) & ~models.Q(serial_number=""),
                name="device_push_serial_unique",
            ),
        ]
        # Talking to a clock is more than changing its row: each has its own
        # permission, so a view-only user can look at devices and change nothing.
        permissions = [
            ("poll_device", "Can poll devices (download their punches)"),
            ("test_device", "Can test the connection to devices"),
            ("sync_device_clock", "Can set the clock of devices"),
            ("manage_device_users", "Can add, change and remove the users on devices"),
        ]

    def __str__(self) -> str:
        return self.name

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    @property
    def pushes(self) -> bool:
        """The clock has called /iclock/ (core.adms) at least once."""
        return self.first_seen_at is not None

    @property
    def log_fill_percent(self) -> float | None:
        if not self.record_capacity or self.record_count is None:
            return None
        return round(100.0 * self.record_count / self.record_capacity, 1)


class Employee(models.Model):
    """A person as the devices know them, keyed by the user id shown on the clock."""

    user_id = models.CharField("user ID", max_length=24, unique=True)
    name = models.CharField(max_length=100, blank=True)
    card = models.PositiveBigIntegerField(default=0)
    privilege = models.PositiveSmallIntegerField(default=0)
    devices = models.ManyToManyField(Device, related_name="employees", blank=True)
    # Outlier rule overrides for this person (a night porter); they win over the device's.
    work_start_time = models.TimeField(null=True, blank=True)
    work_end_time = models.TimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["user_id"]

    def __str__(self) -> str:
        return f"{self.user_id} {self.name}".strip()


class RawAttendance(models.Model):
    """One punch exactly as a device recorded it, with its time in UTC."""

    class PunchState(models.IntegerChoices):
        CHECK_IN = 0, "Check-in"
        CHECK_OUT = 1, "Check-out"
        BREAK_OUT = 2, "Break-out"
        BREAK_IN = 3, "Break-in"
        OVERTIME_IN = 4, "Overtime-in"
        OVERTIME_OUT = 5, "Overtime-out"
        UNDEFINED = 255, "Undefined"

    class VerifyType(models.IntegerChoices):
        UNKNOWN = 0, "Unknown"
        FINGERPRINT = 1, "Fingerprint"
        PASSWORD = 3, "Password"
        CARD = 4, "Card"
        FACE = 15, "Face"

    # No index of its own: the unique (device, user_id, timestamp) constraint
    # serves lookups by device, and every index slows the bulk insert of a poll.
    device = models.ForeignKey(
        Device, on_delete=models.PROTECT, related_name="punches", db_index=False
    )
    user_id = models.CharField("user ID", max_length=24)
    timestamp = models.DateTimeField(help_text="When the punch happened, in UTC.")
    # The device's raw status byte, kept as sent; verify_type is what it means
    # on current firmware (the verification method).
    status = models.PositiveSmallIntegerField(default=0)
    punch_state = models.PositiveSmallIntegerField(default=0, choices=PunchState.choices)
    verify_type = models.PositiveSmallIntegerField(default=0, choices=VerifyType.choices)
    # The verdict processing reads: the automatic one (core.ingest judges each
    # punch again at every download), or the operator's when one is set.
    is_suspect = models.BooleanField(default=False)
    suspect_reason = models.CharField(max_length=200, blank=True)
    # An operator's verdict (admin), which later downloads never overwrite;
    # None means the automatic verdict stands.
    suspect_override = models.BooleanField(null=True, blank=True)
    # A username, not a foreign key: a constraint would add a check per
    # inserted punch to every poll, and the record must outlive the account.
    suspect_override_by = models.CharField(max_length=150, blank=True, db_default="")
    suspect_override_at = models.DateTimeField(null=True, blank=True)
    # When the poll that stored the punch wrote it (not when the poll started).
    received_at = models.DateTimeField(default=now)
    # When the verdict last changed after the punch was stored (a later
    # download, or an operator); processing reads such punches as new.
    revised_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name = "raw punch"
        verbose_name_plural = "raw punches"
        ordering = ["-timestamp"]
        constraints = [
            models.UniqueConstraint(
                fields=["device", "user_id", "timestamp"], name="raw_attendance_unique_punch"
            ),
        ]
        indexes = [
            models.Index(fields=["user_id", "timestamp"], name="raw_attendance_user_time"),
            models.Index(fields=["timestamp"], name="raw_attendance_time"),
            # Partial: nearly every punch is never revised, and an index that
            # held them all would slow every poll's bulk insert.
            models.Index(
                fields=["revised_at"],
                name="raw_attendance_revised",
                condition=models.Q(revised_at__isnull=False),
            ),
        ]
        permissions = [("judge_punch", "Can set or clear the suspect flag of punches")]

    def __str__(self) -> str:
        return f"{self.user_id} @ {self.timestamp:%Y-%m-%d %H:%M:%S} UTC on device {self.device_id}"


class DeliveryState(models.Model):
    """Where a record's delivery to the CRM stands (core.crm): the fields daily
    records and raw punches share. Each model adds its own sync_state and version."""

    synced_version = models.PositiveIntegerField(null=True, blank=True)
    sync_attempts = models.PositiveIntegerField(default=0)
    last_sync_attempt = models.DateTimeField(null=True, blank=True)
    last_sync_error = models.TextField(blank=True)
    next_sync_at = models.DateTimeField(null=True, blank=True)
    # The CRM's own answer to this record when it refused it alone (rejected).
    crm_status = models.PositiveSmallIntegerField("CRM status", null=True, blank=True)
    crm_response = models.TextField("CRM response", blank=True, default="", db_default="")
    # A batch in flight: its idempotency key, the version it carries and how
    # long the run that claimed it owns it. A run that dies leaves them set;
    # once the lease is over, the next run sends the same batch under the same
    # key (core.crm). Both defaults: processing writes new rows with COPY,
    # naming every column with its model default.
    delivery_key = models.CharField(max_length=64, blank=True, default="", db_default="")
    delivery_version = models.PositiveIntegerField(null=True, blank=True)
    delivery_lease_until = models.DateTimeField(null=True, blank=True)
    # Part of the idempotency key: a Resend asks the CRM again, where a retry
    # of the same version under the same key would get the first answer back.
    resend_count = models.PositiveIntegerField(default=0, db_default=0)

    class Meta:
        abstract = True


class ProcessedAttendance(DeliveryState):
    """One employee's shift: first punch in, last punch out, across all devices.

    Built by core.processing; delivered to the CRM by core.crm. A change of the
    computed values bumps `version`, which makes the row due for delivery again.
    """

    class SyncState(models.TextChoices):
        PENDING = "pending", "Pending"
        SYNCED = "synced", "Synced"
        FAILED = "failed", "Failed"
        REJECTED = "rejected", "Rejected"

    user_id = models.CharField("user ID", max_length=24)
    employee = models.ForeignKey(
        Employee, null=True, blank=True, on_delete=models.SET_NULL, related_name="days"
    )
    work_date = models.DateField(help_text="Local date of the shift's first punch.")
    clock_in = models.DateTimeField(null=True, blank=True)
    clock_out = models.DateTimeField(null=True, blank=True)
    # No index on these four foreign keys: a handful of devices and HR users
    # make them useless to a query, and each one slowed a full processing run
    # (500 000 rows) by about a second.
    # No database constraint: these devices took the day's punches, and the
    # database already refuses to delete a device that has punches
    # (RawAttendance.device). A per-row check on every processed day would only
    # slow the bulk writes of a run. The ORM still applies SET_NULL.
    clock_in_device = models.ForeignKey(
        Device,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        db_index=False,
        db_constraint=False,
    )
    clock_out_device = models.ForeignKey(
        Device,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        db_index=False,
        db_constraint=False,
    )
    punch_count = models.PositiveIntegerField(default=0)
    worked = models.DurationField(null=True, blank=True)
    is_outlier = models.BooleanField(default=False)
    # [{"code": "early_clock_in", "message": "early_clock_in: 05:10 is 2h50m before 08:00"}]
    outlier_reasons = models.JSONField(default=list, blank=True)
    ignored_suspect_punches = models.PositiveIntegerField(default=0)

    # HR corrections: processing never overwrites a manual row.
    is_manual = models.BooleanField(default=False)
    edited_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        db_index=False,
    )
    edited_at = models.DateTimeField(null=True, blank=True)
    has_newer_punches = models.BooleanField(
        default=False, help_text="Punches arrived after a manual edit; review the day."
    )
    reviewed_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        db_index=False,
    )
    reviewed_at = models.DateTimeField(null=True, blank=True)

    version = models.PositiveIntegerField(default=1)

    # Delivery to the CRM (core.crm).
    sync_state = models.CharField(
        max_length=10, choices=SyncState.choices, default=SyncState.PENDING
    )
    # Position in the pull feed (core.crm.crm_changes): set by a database
    # trigger (migration 0008) whenever a row is written with a new version,
    # so that every writer, present or future, keeps the feed.
    change_seq = models.BigIntegerField(null=True, blank=True, editable=False)

    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name = "daily attendance"
        verbose_name_plural = "daily attendance"
        ordering = ["-work_date", "user_id"]
        constraints = [
            models.UniqueConstraint(
                fields=["user_id", "work_date"], name="processed_attendance_one_per_day"
            ),
        ]
        indexes = [
            models.Index(fields=["work_date"], name="processed_work_date"),
            models.Index(fields=["sync_state", "next_sync_at"], name="processed_sync_due"),
            models.Index(fields=["updated_at"], name="processed_updated"),
            models.Index(fields=["change_seq"], name="processed_change_seq"),
            # Partial: only rows in flight carry a key.
            models.Index(
                fields=["delivery_key"],
                name="processed_in_flight",
                condition=~models.Q(delivery_key=""),
            ),
        ]
        # Sending again is more than viewing a row: each action has its own permission.
        permissions = [
            ("resend_processedattendance", "Can resend daily records to the CRM"),
            ("process_processedattendance", "Can run processing of punches into daily records"),
            ("reset_failed_processedattendance", "Can make failed deliveries due again"),
        ]

    def __str__(self) -> str:
        return f"{self.user_id} on {self.work_date}"


class ProcessedAttendanceVersion(models.Model):
    """A version of a daily record the pull feed still serves after the row
    moved on (superseded by a newer version, or deleted), or the tombstone of a
    deleted row (`deleted`, with its last version's values and number). Written only by database triggers (migration 0011),
    whoever changes the row, in the writer's transaction; the current versions
    stay in ProcessedAttendance. Dropped after CRM_FEED_RETENTION_DAYS.
    """

    # The version's position in the feed: the change_seq it had, or a new one
    # for a deletion.
    seq = models.BigIntegerField(primary_key=True)
    # The change number of the write that replaced it (its own seq for a
    # tombstone): a consumer that started after that write never needs it.
    replaced_by = models.BigIntegerField()
    day_id = models.BigIntegerField(help_text="The daily record's id (it may be gone).")
    deleted = models.BooleanField(default=False)
    user_id = models.CharField("user ID", max_length=24)
    # No database constraints: a version outlives the employee or device it
    # names; the feed then shows no name, as it would for the live row.
    employee = models.ForeignKey(
        Employee,
        null=True,
        on_delete=models.DO_NOTHING,
        related_name="+",
        db_index=False,
        db_constraint=False,
    )
    work_date = models.DateField()
    version = models.PositiveIntegerField()
    clock_in = models.DateTimeField(null=True)
    clock_out = models.DateTimeField(null=True)
    clock_in_device = models.ForeignKey(
        Device,
        null=True,
        on_delete=models.DO_NOTHING,
        related_name="+",
        db_index=False,
        db_constraint=False,
    )
    clock_out_device = models.ForeignKey(
        Device,
        null=True,
        on_delete=models.DO_NOTHING,
        related_name="+",
        db_index=False,
        db_constraint=False,
    )
    punch_count = models.PositiveIntegerField()
    worked = models.DurationField(null=True)
    is_outlier = models.BooleanField()
    outlier_reasons = models.JSONField(default=list)
    is_manual = models.BooleanField()
    recorded_at = models.DateTimeField(default=now)

    class Meta:
        verbose_name = "daily attendance version"
        indexes = [
            models.Index(fields=["recorded_at"], name="processed_version_recorded"),
            models.Index(fields=["replaced_by"], name="processed_version_replaced"),
        ]

    def __str__(self) -> str:
        state = "deleted" if self.deleted else "superseded"
        return f"{self.user_id} on {self.work_date} v{self.version} ({state})"


class PunchDelivery(DeliveryState):
    """A raw punch on its way to CRM_PUNCHES_URL (core.crm): one row per punch,
    its primary key the punch's, so a punch is registered, claimed and booked
    once. Its own table, not columns of RawAttendance: a poll's bulk insert
    pays nothing for it. Delivered rows are dropped once no run can read their
    punch again (below the registration watermark)."""

    class SyncState(models.TextChoices):
        PENDING = "pending", "Pending"
        SYNCED = "synced", "Synced"
        FAILED = "failed", "Failed"
        REJECTED = "rejected", "Rejected by the CRM"
        # Suspect when registered: sent once an operator clears the verdict.
        HELD = "held", "Held back (suspect)"

    raw = models.OneToOneField(
        RawAttendance, on_delete=models.CASCADE, primary_key=True, related_name="delivery"
    )
    # A punch has one version; the field lets the delivery code serve daily
    # records and punches alike.
    version = models.PositiveIntegerField(default=1)
    sync_state = models.CharField(
        max_length=10, choices=SyncState.choices, default=SyncState.PENDING
    )
    created_at = models.DateTimeField(default=now)

    class Meta:
        verbose_name = "raw punch delivery"
        verbose_name_plural = "raw punch deliveries"
        indexes = [
            models.Index(fields=["sync_state", "next_sync_at"], name="punch_delivery_due"),
            models.Index(
                fields=["delivery_key"],
                name="punch_delivery_in_flight",
                condition=~models.Q(delivery_key=""),
            ),
        ]
        # As for daily records: sending again is more than viewing a delivery.
        permissions = [
            ("resend_punchdelivery", "Can resend raw punches to the CRM"),
            ("reset_failed_punchdelivery", "Can make failed punch deliveries due again"),
        ]

    def __str__(self) -> str:
        return f"punch {self.raw_id}: {self.sync_state}"


class ProcessingState(models.Model):
    """Where incremental processing left off (core.processing), one row per pipeline.

    `recent_runs` holds [started_at ISO, highest raw punch id seen] for the last
    few runs: enough to re-read punches whose transaction committed after a run
    had already read past their id (see core.processing.planning for the reasoning).
    """

    name = models.CharField(max_length=50, unique=True)
    last_raw_id = models.BigIntegerField(default=0)
    last_run_at = models.DateTimeField(null=True, blank=True)
    recent_runs = models.JSONField(default=list, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"{self.name} (raw id {self.last_raw_id})"


class DeliveryLog(models.Model):
    """One request to the CRM (a batch, or a single record after a batch was
    refused): what was sent and what came back. Kept DELIVERY_LOG_DAYS."""

    class Outcome(models.TextChoices):
        ACKNOWLEDGED = "acknowledged", "Acknowledged"
        TRANSIENT = "transient", "Transient failure (retried)"
        REFUSED = "refused", "Refused (4xx)"
        CREDENTIALS = "credentials", "Credentials refused (401/403)"

    created_at = models.DateTimeField(default=now)
    destination = models.CharField(max_length=200)
    idempotency_key = models.CharField(max_length=100)
    attempt = models.PositiveSmallIntegerField(default=1)
    records = models.PositiveIntegerField(help_text="Records in the request.")
    # The first few, for a search by employee day.
    external_ids = models.TextField("external IDs", blank=True)
    status_code = models.PositiveSmallIntegerField(null=True, blank=True)
    outcome = models.CharField(max_length=12, choices=Outcome.choices)
    duration_ms = models.PositiveIntegerField()
    response_excerpt = models.TextField(blank=True, help_text="The first part of the answer.")
    error = models.TextField(blank=True)

    class Meta:
        verbose_name = "CRM delivery log entry"
        verbose_name_plural = "CRM delivery log"
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["created_at"], name="delivery_log_created")]

    def __str__(self) -> str:
        status = self.status_code or self.error[:40] or "no answer"
        return f"{self.created_at:%Y-%m-%d %H:%M:%S} {self.records} records: {status}"


class Timesheet(ProcessedAttendance):
    """The timesheet report (core.reports) in the admin and the API: a proxy of
    the daily records for its page and its one permission, core.view_timesheet."""

    class Meta:
        proxy = True
        verbose_name = "timesheet"
        verbose_name_plural = "timesheets"
        default_permissions = ("view",)


class RunRequest(models.Model):
    """A follow-up run asked for and not started yet (core.pipeline): at most
    one queued run per name, however many polls ask, across every worker."""

    name = models.CharField(max_length=50, unique=True)
    # Set when a run is queued, cleared when it starts; a run queued but lost
    # (a broker flushed) stops blocking new requests at this moment.
    queued_until = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return self.name


# --- Operations: what /health/ and /metrics read (core.health, core.metrics) ---------


class Heartbeat(models.Model):
    """When a periodic job last ran: `beat` is written by core.tasks.heartbeat,
    which beat queues and a worker runs."""

    name = models.CharField(max_length=50, unique=True)
    at = models.DateTimeField()

    def __str__(self) -> str:
        return f"{self.name} at {self.at:%Y-%m-%d %H:%M:%S} UTC"


class Counter(models.Model):
    """A running total for /metrics (polls by outcome, punches stored, processing
    runs, delivered records by outcome), kept in the database so that every web
    and worker process, on every machine, adds to and reads the same figure.
    Written with one upsert per event (core.metrics.counter_add), never per punch.
    """

    name = models.CharField(max_length=50)
    # 0 when the total is not a device's; a plain number, so that a deleted
    # device's totals go with no constraint to check.
    device_id = models.PositiveIntegerField(default=0)
    outcome = models.CharField(max_length=20, blank=True, default="")
    value = models.PositiveBigIntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["name", "device_id", "outcome"], name="counter_unique_key"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.name}[{self.device_id},{self.outcome}] = {self.value}"


# --- Clocks that push (ADMS, core.adms) ----------------------------------------------


class DeviceCommand(models.Model):
    """A command for a pushing clock, handed over at its next poll (getrequest)
    and answered by its result (devicecmd). Its id is the protocol's CmdID."""

    class State(models.TextChoices):
        QUEUED = "queued", "Queued"
        SENT = "sent", "Sent, waiting for the result"
        DONE = "done", "Done"
        FAILED = "failed", "Failed"

    device = models.ForeignKey(Device, on_delete=models.CASCADE, related_name="commands")
    command = models.TextField(help_text="The command line exactly as the clock receives it.")
    state = models.CharField(max_length=6, choices=State.choices, default=State.QUEUED)
    return_code = models.IntegerField(null=True, blank=True)
    result = models.TextField(blank=True, help_text="What the clock answered.")
    created_by = models.CharField(max_length=150, blank=True)
    created_at = models.DateTimeField(default=now)
    sent_at = models.DateTimeField(null=True, blank=True)
    answered_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name = "device command"
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["device", "state"], name="device_command_due")]
        # Each kind of command has its own permission; user commands take
        # core.manage_device_users (Device).
        permissions = [
            ("send_info_command", "Can ask pushing devices for their info"),
            ("send_check_command", "Can make pushing devices re-read their options"),
            ("send_reboot_command", "Can reboot pushing devices"),
            ("send_reupload_command", "Can make pushing devices upload a date range again"),
        ]

    def __str__(self) -> str:
        # Read on admin pages (titles, deletions) and in their log: masked.
        # Imported here: core.adms imports this module.
        from core.adms import command_shown

        return f"{self.pk}: {command_shown(self.command)[:60]} ({self.state})"


class PushRejectedLine(models.Model):
    """A line of a clock's upload that could not be read: kept for an operator,
    while the rest of the batch is stored and acknowledged."""

    device = models.ForeignKey(Device, on_delete=models.CASCADE, related_name="rejected_lines")
    table = models.CharField(max_length=32)
    line = models.TextField(help_text="The line as received (bytes that are not text replaced).")
    reason = models.CharField(max_length=200)
    # sha256 of the raw line: a batch sent again does not record its lines twice.
    digest = models.CharField(max_length=64)
    received_at = models.DateTimeField(default=now)

    class Meta:
        verbose_name = "rejected push line"
        ordering = ["-received_at", "-id"]
        constraints = [
            models.UniqueConstraint(
                fields=["device", "table", "digest"], name="push_rejected_line_once"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.table} line from device {self.device_id}: {self.reason}"
