"""Settings for Attendance Bridge.

Everything that differs between a laptop and production comes from the
environment (a `.env` file beside manage.py is loaded when present). Every
variable read here is listed with its default in `.env.example`.

With no DATABASE_URL, CELERY_BROKER_URL and CACHE_URL the project runs on
embedded defaults: a SQLite file, a filesystem broker and a file cache, all
under var/.
"""

import datetime
import ipaddress
import os
import re
from pathlib import Path
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import dj_database_url
from celery.schedules import crontab
from django.core.exceptions import ImproperlyConfigured
from dotenv import load_dotenv
from kombu import Exchange, Queue

from core.device_facts import OBSERVED_FIELDS as DEVICE_OBSERVED_FIELDS

BASE_DIR = Path(__file__).resolve().parent.parent
load_dotenv(BASE_DIR / ".env")


# --- Strict environment helpers ------------------------------------------------
# A typo in an environment variable must stop the process at start-up with a
# message naming the variable, not surface hours later as odd behaviour.


def envstr(name: str, default: str) -> str:
    return os.environ.get(name, default)


def envbool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ImproperlyConfigured(f"{name} must be true or false, got {value!r}")


def envint(name: str, default: int, *, minimum: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be a whole number, got {value!r}") from None
    if minimum is not None and number < minimum:
        raise ImproperlyConfigured(f"{name} must be at least {minimum}, got {number}")
    return number


def envfloat(name: str, default: float, *, minimum: float | None = None) -> float:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        number = float(value)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be a number, got {value!r}") from None
    if minimum is not None and number < minimum:
        raise ImproperlyConfigured(f"{name} must be at least {minimum}, got {number}")
    return number


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def envduration(name: str, default: str) -> datetime.timedelta:
    """A duration written as a number and a unit: 45s, 15m, 12h, 1d."""
    value = envstr(name, default).strip()
    unit = _DURATION_UNITS.get(value[-1:].lower())
    try:
        if unit is None:
            raise ValueError
        number = float(value[:-1])
    except ValueError:
        raise ImproperlyConfigured(
            f"{name} must be a duration such as 90s, 15m, 12h or 1d, got {value!r}"
        ) from None
    if number < 0:
        raise ImproperlyConfigured(f"{name} must not be negative, got {value!r}")
    return datetime.timedelta(seconds=number * unit)


def envlist(name: str, default: list[str]) -> list[str]:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return default
    return [item.strip() for item in value.split(",") if item.strip()]


def envtime(name: str, default: str) -> datetime.time:
    value = envstr(name, default)
    try:
        return datetime.time.fromisoformat(value)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be a time like 08:00, got {value!r}") from None


def envzone(name: str, default: str) -> str:
    value = envstr(name, default)
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ImproperlyConfigured(
            f"{name} must be an IANA time zone name such as Europe/Lisbon, got {value!r}"
        ) from None
    return value


# --- Core ----------------------------------------------------------------------

DEBUG = envbool("DEBUG", False)

SECRET_KEY = os.environ.get("SECRET_KEY", "")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured(
            "SECRET_KEY is not set. Set it in the environment or in .env "
            "(or set DEBUG=true for a local, insecure development key)."
        )
    SECRET_KEY = "insecure-development-key-do-not-use-in-production"

ALLOWED_HOSTS = envlist("ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]"])
CSRF_TRUSTED_ORIGINS = envlist("CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    # The admin, with the HR status page as its first page (core.admin_status).
    "core.apps.BridgeAdminConfig",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "auditlog",
    "core",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # Serves the admin's CSS and JS from gunicorn, collected by start_server.sh.
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    # The audit log's actor and address (core.audit): after authentication.
    "core.audit.AuditActorMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "attendance_bridge.urls"
WSGI_APPLICATION = "attendance_bridge.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "var" / "static"
# Compressed copies beside each file, served by WhiteNoise. Not the manifest
# variant: that one fails every page whose static files were not collected
# (tests, a first `runserver`), for a cache gain the admin does not need.
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# All stored times are aware UTC. Device-local wall-clock times are converted
# at the device boundary (core.ingest) with the device's own IANA zone.
USE_TZ = True
TIME_ZONE = "UTC"
LANGUAGE_CODE = "en-us"
USE_I18N = True

# A relative VAR_DIR is taken from the project folder, not the current directory.
VAR_DIR = BASE_DIR / envstr("VAR_DIR", "var")
VAR_DIR.mkdir(parents=True, exist_ok=True)


# --- Database --------------------------------------------------------------------
# PostgreSQL in production (postgres://user@host:5432/name); SQLite under var/
# when DATABASE_URL is unset.

DATABASE_URL = envstr("DATABASE_URL", "")
if DATABASE_URL:
    try:
        DATABASES = {"default": dj_database_url.parse(DATABASE_URL, conn_max_age=60)}
    except ValueError as exc:
        raise ImproperlyConfigured(f"DATABASE_URL is not a valid database URL: {exc}") from None
else:
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": VAR_DIR / "attendance_bridge.sqlite3",
            "OPTIONS": {
                # Web, worker and beat share the file: a writer waits this long
                # for another's lock before it fails with "database is locked".
                "timeout": envint("SQLITE_BUSY_TIMEOUT_SECONDS", 20, minimum=1),
                # A transaction takes the write lock when it begins, so it waits
                # for that timeout too: a read that turns into a write mid-way
                # would otherwise fail at once ("database is locked") whenever
                # another process writes, since SQLite cannot wait there safely.
                "transaction_mode": "IMMEDIATE",
            },
        }
    }


# --- Celery ------------------------------------------------------------------------
# Redis in production (redis://127.0.0.1:6379/0). Without CELERY_BROKER_URL the
# worker and beat use kombu's filesystem transport, which needs no server.

CELERY_BROKER_URL = envstr("CELERY_BROKER_URL", "")
if not CELERY_BROKER_URL:
    CELERY_BROKER_URL = "filesystem://"
    _broker_dir = VAR_DIR / "broker"
    (_broker_dir / "queue").mkdir(parents=True, exist_ok=True)
    (_broker_dir / "processed").mkdir(parents=True, exist_ok=True)
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(_broker_dir / "queue"),
        "data_folder_out": str(_broker_dir / "queue"),
        "processed_folder": str(_broker_dir / "processed"),
        "store_processed": False,
        # Its exchange table, which kombu otherwise writes to ./control.
        "control_folder": str(_broker_dir / "control"),
    }
else:
    # How long Redis waits for an unacknowledged task before giving it to
    # another worker. Far above the hard time limit (checked below), so a
    # task that is still running is never handed out twice.
    CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 3600}
CELERY_TASK_ALWAYS_EAGER = envbool("CELERY_TASK_ALWAYS_EAGER", False)
# A task is acknowledged only after it ran, so a worker killed mid-task leaves
# it on the queue; every task is idempotent, so running one twice is harmless.
CELERY_TASK_ACKS_LATE = True
# ... and that includes a worker process killed by the system (out of memory):
# its task goes back to the queue instead of being acknowledged as failed.
CELERY_TASK_REJECT_ON_WORKER_LOST = True
# A worker that loses the broker stops its acknowledged-late tasks, which the
# broker hands out again; otherwise they would run twice at the same time.
CELERY_WORKER_CANCEL_LONG_RUNNING_TASKS_ON_CONNECTION_LOSS = True
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# One task at a time per worker process: polls and deliveries are long-ish I/O,
# and a prefetched task would wait behind a slow one while other workers idle.
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
# A hung device or CRM must not hold a worker forever. Both limits stay far
# below the broker's visibility timeout and below LATE_COMMIT_MARGIN (checked
# in the schedule section): a poll's write-to-commit cannot outlast its task.
CELERY_TASK_SOFT_TIME_LIMIT = envint("CELERY_TASK_SOFT_TIME_LIMIT", 300, minimum=1)
CELERY_TASK_TIME_LIMIT = CELERY_TASK_SOFT_TIME_LIMIT + 60
# JSON only: task arguments are ids and small values, and a worker never
# unpickles what another process put on the broker.
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
# Nothing reads task results; the stages record their outcome in the database.
CELERY_TASK_IGNORE_RESULT = True
# One queue per kind of work, so a slow CRM or a long processing run never
# holds polls back. A worker started without --queues consumes all three.
CELERY_TASK_QUEUES = [
    Queue(name, Exchange(name), routing_key=name) for name in ("devices", "processing", "crm")
]
CELERY_TASK_DEFAULT_QUEUE = "processing"
CELERY_TASK_ROUTES = {
    "core.tasks.poll_device": {"queue": "devices"},
    "core.tasks.poll_all_devices": {"queue": "devices"},
    "core.tasks.test_device": {"queue": "devices"},
    "core.tasks.sync_device_time": {"queue": "devices"},
    "core.tasks.clear_device_log": {"queue": "devices"},
    "core.tasks.sync_to_crm": {"queue": "crm"},
    "core.tasks.sync_punches_to_crm": {"queue": "crm"},
    "core.tasks.retry_failed_syncs": {"queue": "crm"},
}


# --- Cache -------------------------------------------------------------------------
# The API's request counts (core.api.throttling) live here, so every web process
# must see the same cache: one of its own per process would make each limit as
# many times looser, and forget it at a restart. Redis when the web runs on
# several machines (redis://127.0.0.1:6379/1); without CACHE_URL, files under
# var/, which the processes of one machine share without a server. Never the
# broker's Redis unasked: clearing a cache empties its whole database, and a
# queue and a cache want different memory policies.

CACHE_URL = envstr("CACHE_URL", "")
if CACHE_URL:
    _cache_url = urlsplit(CACHE_URL)
    try:
        _cache_url_ok = (
            _cache_url.scheme in ("redis", "rediss")
            and bool(_cache_url.hostname)
            and _cache_url.port != 0
            # The database written out: left off, Redis takes 0, the broker's usual.
            and re.fullmatch(r"/\d+", _cache_url.path) is not None
        )
    except ValueError:  # a port that is not a number
        _cache_url_ok = False
    if not _cache_url_ok:
        # Shown without its password.
        _shown = _cache_url._replace(netloc=_cache_url.netloc.rpartition("@")[2]).geturl()
        raise ImproperlyConfigured(
            "CACHE_URL must be a Redis URL with a database number, such as "
            f"redis://127.0.0.1:6379/1 (rediss:// for TLS), got {_shown!r}"
        )
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": CACHE_URL,
            # A Redis that stops answering fails a request within seconds,
            # not at the web server's timeout.
            "OPTIONS": {"socket_connect_timeout": 5, "socket_timeout": 5},
        }
    }
else:
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.filebased.FileBasedCache",
            "LOCATION": VAR_DIR / "cache",
            # Past this many files a third are deleted at random, live counts
            # included: far above the users and addresses of one throttle period.
            "OPTIONS": {"MAX_ENTRIES": 10000},
        }
    }


# --- Devices and ingest --------------------------------------------------------------

# Zone for new devices whose clocks show local time (each device can override it).
DEVICE_DEFAULT_TIMEZONE = envzone("DEVICE_DEFAULT_TIMEZONE", "UTC")
# Seconds a device may take to answer before the poll gives up on it.
DEVICE_TIMEOUT_SECONDS = envint("DEVICE_TIMEOUT_SECONDS", 30, minimum=1)
# A full download is forced this often even when the record count is unchanged,
# because a device can be cleared and refilled to the same count.
FULL_POLL_HOURS = envint("FULL_POLL_HOURS", 24, minimum=1)
# A punch dated further ahead of the server's now (in the device's zone) than
# this is suspect: the clock was set wrong when it was taken.
SUSPECT_FUTURE_TOLERANCE = envduration("SUSPECT_FUTURE_TOLERANCE", "1d")
# A device clock further off the server's than this is reported at every poll
# (admin health, the poll's log line); its punches are still judged by the
# server's time.
CLOCK_DRIFT_ALERT_SECONDS = envint("CLOCK_DRIFT_ALERT_SECONDS", 300, minimum=1)


# --- Clocks that push (ADMS, core.adms) -------------------------------------------------

# Enable a clock the first time its serial number calls in; off, it waits
# (disabled, its records kept on the clock) until an operator enables it.
ADMS_AUTO_APPROVE = envbool("ADMS_AUTO_APPROVE", False)
# Addresses (CIDR, comma-separated) allowed to call /iclock/; empty allows any.
# Behind a reverse proxy this is the proxy's address: filter at the proxy too.
ADMS_ALLOWED_NETWORKS = []
for _network in envlist("ADMS_ALLOWED_NETWORKS", []):
    try:
        ADMS_ALLOWED_NETWORKS.append(ipaddress.ip_network(_network, strict=False))
    except ValueError:
        raise ImproperlyConfigured(
            f"ADMS_ALLOWED_NETWORKS must be CIDR networks such as 10.0.0.0/8, got {_network!r}"
        ) from None
# Seconds between a clock's polls for commands (Delay, 2 to 60 on firmware).
ADMS_DELAY_SECONDS = envint("ADMS_DELAY_SECONDS", 10, minimum=1)
# Seconds a clock waits before it tries again after a failure (ErrorDelay).
ADMS_ERROR_DELAY_SECONDS = envint("ADMS_ERROR_DELAY_SECONDS", 30, minimum=1)
# Minutes between a clock's checks for new records to upload (TransInterval);
# live punches come at once anyway (Realtime=1).
ADMS_TRANS_INTERVAL_MINUTES = envint("ADMS_TRANS_INTERVAL_MINUTES", 1, minimum=0)
# A command handed to a clock and not answered within this is marked failed.
ADMS_COMMAND_TIMEOUT = envduration("ADMS_COMMAND_TIMEOUT", "10m")
# Larger request bodies get 413. Firmware sends batches of at most ~150
# records; a refused body is sent again, so keep this well above that.
ADMS_MAX_BODY_BYTES = envint("ADMS_MAX_BODY_BYTES", 4 * 1024 * 1024, minimum=1024)


# --- Daily processing ----------------------------------------------------------------

# Incremental processing re-reads punches stored this long before the previous
# run started, to catch a poll whose rows were written (received_at) before
# that run but committed after it. It must exceed the longest time from a
# poll's write to its commit; a poll's write and commit are one short
# transaction, so the default leaves a wide margin.
LATE_COMMIT_MARGIN = envduration("LATE_COMMIT_MARGIN", "15m")
# A shift takes in every punch within this many hours of its first punch.
MAX_SHIFT_HOURS = envint("MAX_SHIFT_HOURS", 16, minimum=1)
# Punches of one employee this close together count as one (double taps).
DEDUPE_WINDOW_SECONDS = envint("DEDUPE_WINDOW_SECONDS", 60, minimum=0)
# Outlier rules: the expected working day, and how far from it is unusual.
WORK_START_TIME = envtime("WORK_START_TIME", "08:00")
WORK_END_TIME = envtime("WORK_END_TIME", "17:00")
EARLY_CLOCK_IN_MINUTES = envint("EARLY_CLOCK_IN_MINUTES", 120, minimum=0)
LATE_CLOCK_IN_MINUTES = envint("LATE_CLOCK_IN_MINUTES", 120, minimum=0)
EARLY_CLOCK_OUT_MINUTES = envint("EARLY_CLOCK_OUT_MINUTES", 120, minimum=0)
LATE_CLOCK_OUT_MINUTES = envint("LATE_CLOCK_OUT_MINUTES", 180, minimum=0)


# --- Delivery to the CRM (core.crm) --------------------------------------------------

# Where daily records are POSTed (see docs/crm-contract.md); empty turns push
# off, and the CRM reads the pull feed alone.
CRM_API_URL = envstr("CRM_API_URL", "").strip()
if CRM_API_URL and not CRM_API_URL.startswith(("http://", "https://")):
    raise ImproperlyConfigured(
        f"CRM_API_URL must start with http:// or https://, got {CRM_API_URL!r}"
    )
# Where raw punches are POSTed too, one device per request (the punch contract
# in docs/crm-contract.md), with the same credentials, batching, retries and
# delivery log as daily records; empty turns the raw punch export off.
CRM_PUNCHES_URL = envstr("CRM_PUNCHES_URL", "").strip()
if CRM_PUNCHES_URL and not CRM_PUNCHES_URL.startswith(("http://", "https://")):
    raise ImproperlyConfigured(
        f"CRM_PUNCHES_URL must start with http:// or https://, got {CRM_PUNCHES_URL!r}"
    )
# The Authorization header's scheme: CRMs differ (Token for Django REST
# framework's TokenAuthentication, Bearer for OAuth-style tokens).
CRM_AUTH_SCHEME = envstr("CRM_AUTH_SCHEME", "Token").strip()
if CRM_AUTH_SCHEME not in ("Token", "Bearer"):
    raise ImproperlyConfigured(f"CRM_AUTH_SCHEME must be Token or Bearer, got {CRM_AUTH_SCHEME!r}")
CRM_API_TOKEN = envstr("CRM_API_TOKEN", "")
# A file holding the token (a mounted secret), read at each run so a rotated
# token is picked up without a restart.
CRM_API_TOKEN_FILE = envstr("CRM_API_TOKEN_FILE", "").strip()
if CRM_API_TOKEN and CRM_API_TOKEN_FILE:
    raise ImproperlyConfigured("Set CRM_API_TOKEN or CRM_API_TOKEN_FILE, not both.")
# When set, every request carries X-Signature (HMAC-SHA256) so the CRM can
# tell the bridge's requests from forgeries.
CRM_SIGNING_SECRET = envstr("CRM_SIGNING_SECRET", "")
# Records per request; a CRM that limits request size wants it smaller.
CRM_BATCH_SIZE = envint("CRM_BATCH_SIZE", 100, minimum=1)
# A CRM that neither accepts nor answers must not hold a run forever.
CRM_CONNECT_TIMEOUT_SECONDS = envfloat("CRM_CONNECT_TIMEOUT_SECONDS", 5, minimum=0.1)
CRM_READ_TIMEOUT_SECONDS = envfloat("CRM_READ_TIMEOUT_SECONDS", 30, minimum=0.1)
# A company's own certificate authority (a PEM file); TLS is always verified.
CRM_CA_BUNDLE = envstr("CRM_CA_BUNDLE", "").strip()
# Some CRMs allow only a few imports a minute; 0 means no pacing.
CRM_MAX_REQUESTS_PER_MINUTE = envint("CRM_MAX_REQUESTS_PER_MINUTE", 0, minimum=0)
# Retries of a batch after a transient failure (408, 429, 5xx, timeout,
# connection error) before its rows become failed.
CRM_MAX_RETRIES = envint("CRM_MAX_RETRIES", 3, minimum=0)
# First wait before a retry; each next one doubles, with jitter.
CRM_RETRY_BACKOFF_SECONDS = envfloat("CRM_RETRY_BACKOFF_SECONDS", 1, minimum=0)
# Longest wait before one retry, Retry-After included: a CRM asking for more
# fails the batch now, and the periodic retry tries again.
CRM_RETRY_MAX_WAIT_SECONDS = envfloat("CRM_RETRY_MAX_WAIT_SECONDS", 60, minimum=0)
# The name the bridge gives itself in every request (source.bridge).
CRM_BRIDGE_NAME = envstr("CRM_BRIDGE_NAME", "attendance-bridge")
# Days before this date are never pushed, so a clock holding years of history
# does not flood the CRM; empty pushes every day.
_crm_sync_from = envstr("CRM_SYNC_FROM", "").strip()
try:
    CRM_SYNC_FROM = datetime.date.fromisoformat(_crm_sync_from) if _crm_sync_from else None
except ValueError:
    raise ImproperlyConfigured(
        f"CRM_SYNC_FROM must be a date like 2026-01-01, got {_crm_sync_from!r}"
    ) from None
# Failed rows become due again this long after their last attempt.
RETRY_FAILED_SYNCS_HOURS = envint("RETRY_FAILED_SYNCS_HOURS", 6, minimum=1)
# Delivery log entries older than this are deleted by each sync run.
DELIVERY_LOG_DAYS = envint("DELIVERY_LOG_DAYS", 30, minimum=1)

# --- CRM pull feed ---------------------------------------------------------------------

# Older versions and deletions stay in the changes feed this many days after
# they were replaced; a cursor older than that is answered 410 (start again).
CRM_FEED_RETENTION_DAYS = envint("CRM_FEED_RETENTION_DAYS", 14, minimum=1)


# --- HR status page (core.status) ---------------------------------------------------

# The zone whose date is "today" for HR: the admin's status page (who is in,
# punches per hour), the admin's date filters (daily attendance, raw punches) and
# the timesheet page's default month; unset or empty, DEVICE_DEFAULT_TIMEZONE.
COMPANY_TIMEZONE = (
    envzone("COMPANY_TIMEZONE", DEVICE_DEFAULT_TIMEZONE)
    if envstr("COMPANY_TIMEZONE", "").strip()
    else DEVICE_DEFAULT_TIMEZONE
)
# A device whose log holds this share of its capacity or more is shown as
# nearly full, before it starts overwriting or refusing punches.
DEVICE_LOG_FULL_ALERT_PERCENT = envint("DEVICE_LOG_FULL_ALERT_PERCENT", 90, minimum=1)
if DEVICE_LOG_FULL_ALERT_PERCENT > 100:
    raise ImproperlyConfigured(
        f"DEVICE_LOG_FULL_ALERT_PERCENT must be at most 100, got {DEVICE_LOG_FULL_ALERT_PERCENT}"
    )

# --- Schedule (Celery beat) ------------------------------------------------------------
# Intervals in minutes; fractions are allowed (0.25 is 15 s, for tests).

# Every enabled device is polled this often, each by its own task.
POLL_INTERVAL_MINUTES = envfloat("POLL_INTERVAL_MINUTES", 15, minimum=0.05)
# Processing also runs this often; a poll that stored punches starts a run at once.
PROCESS_INTERVAL_MINUTES = envfloat("PROCESS_INTERVAL_MINUTES", 60, minimum=0.05)
# Delivery (CRM_API_URL, CRM_PUNCHES_URL) also runs this often; a processing
# run that changed days, or a poll with new punches, starts one at once.
SYNC_INTERVAL_MINUTES = envfloat("SYNC_INTERVAL_MINUTES", 30, minimum=0.05)
# When daily_cleanup runs (retention, device logs), in DEVICE_DEFAULT_TIMEZONE.
DAILY_CLEANUP_AT = envtime("DAILY_CLEANUP_AT", "02:00")
# Raw punches and daily records older than this many days are deleted once
# delivered (core.retention); 0 keeps everything.
RETENTION_DAYS = envint("RETENTION_DAYS", 0, minimum=0)
# Clear a device's attendance log at daily_cleanup once every record on it is
# verified stored and the log is fuller than CLEAR_DEVICE_LOGS_AT_PERCENT.
CLEAR_DEVICE_LOGS = envbool("CLEAR_DEVICE_LOGS", False)
CLEAR_DEVICE_LOGS_AT_PERCENT = envfloat("CLEAR_DEVICE_LOGS_AT_PERCENT", 80, minimum=0)
if CLEAR_DEVICE_LOGS_AT_PERCENT >= 100:
    raise ImproperlyConfigured(
        f"CLEAR_DEVICE_LOGS_AT_PERCENT must be below 100, got {CLEAR_DEVICE_LOGS_AT_PERCENT:g}"
    )

if CELERY_TASK_TIME_LIMIT >= LATE_COMMIT_MARGIN.total_seconds():
    raise ImproperlyConfigured(
        f"CELERY_TASK_SOFT_TIME_LIMIT + 60 s ({CELERY_TASK_TIME_LIMIT} s) must be below "
        f"LATE_COMMIT_MARGIN ({LATE_COMMIT_MARGIN.total_seconds():g} s): processing relies on a "
        "poll committing within the margin. Lower the one or raise the other."
    )
if CELERY_TASK_TIME_LIMIT * 4 > 3600:
    raise ImproperlyConfigured(
        f"CELERY_TASK_SOFT_TIME_LIMIT is {CELERY_TASK_SOFT_TIME_LIMIT} s; at most 840 s keeps "
        "tasks far below the broker's visibility timeout (3600 s)."
    )

# Crontab entries (DAILY_CLEANUP_AT) are read in the company's zone; task
# times on the broker stay UTC.
CELERY_TIMEZONE = DEVICE_DEFAULT_TIMEZONE


def _every(minutes: float) -> dict:
    # A periodic message older than its interval is dropped: the next one is due.
    return {"schedule": minutes * 60, "options": {"expires": minutes * 60}}


CELERY_BEAT_SCHEDULE = {
    "poll-all-devices": {"task": "core.tasks.poll_all_devices", **_every(POLL_INTERVAL_MINUTES)},
    "process-attendance": {
        "task": "core.tasks.process_attendance",
        **_every(PROCESS_INTERVAL_MINUTES),
    },
    "retry-failed-syncs": {
        "task": "core.tasks.retry_failed_syncs",
        **_every(RETRY_FAILED_SYNCS_HOURS * 60),
    },
    "daily-cleanup": {
        "task": "core.tasks.daily_cleanup",
        "schedule": crontab(hour=DAILY_CLEANUP_AT.hour, minute=DAILY_CLEANUP_AT.minute),
        "options": {"expires": 3600},
    },
}
if CRM_API_URL:
    CELERY_BEAT_SCHEDULE["sync-to-crm"] = {
        "task": "core.tasks.sync_to_crm",
        **_every(SYNC_INTERVAL_MINUTES),
    }
if CRM_PUNCHES_URL:
    CELERY_BEAT_SCHEDULE["sync-punches-to-crm"] = {
        "task": "core.tasks.sync_punches_to_crm",
        **_every(SYNC_INTERVAL_MINUTES),
    }


# --- REST API (core.api, docs/api.md) ----------------------------------------------
# HTTP Basic sends the password with every request; off unless an operator
# behind TLS wants it for scripts that cannot fetch a token.
API_BASIC_AUTH = envbool("API_BASIC_AUTH", False)
# Requests per user (and per client address for anonymous ones) on the whole
# API, and on the login endpoints (token and JWT), where guessing passwords
# is what a limit prevents. DRF's form: a number, "/", second|minute|hour|day.
API_THROTTLE_RATE = envstr("API_THROTTLE_RATE", "1000/minute")
API_ANON_THROTTLE_RATE = envstr("API_ANON_THROTTLE_RATE", "60/minute")
API_AUTH_THROTTLE_RATE = envstr("API_AUTH_THROTTLE_RATE", "10/minute")
for _name in ("API_THROTTLE_RATE", "API_ANON_THROTTLE_RATE", "API_AUTH_THROTTLE_RATE"):
    _rate = globals()[_name]
    _count, _, _period = _rate.partition("/")
    if not _count.isdigit() or _period not in ("second", "minute", "hour", "day"):
        raise ImproperlyConfigured(
            f"{_name} must be a count and a period such as 100/minute "
            f"(second, minute, hour or day), got {_rate!r}"
        )
# Reverse proxies in front of the bridge that add the client's address to
# X-Forwarded-For (1 behind the nginx of docs/setup.md). The request limits
# count per address: with 0 the connection's own, otherwise the address the
# outermost proxy saw. A client's own X-Forwarded-For entries are never believed.
API_NUM_PROXIES = envint("API_NUM_PROXIES", 0, minimum=0)
# Rows per page of every list (?limit= asks for fewer or more, up to the maximum).
API_PAGE_SIZE = envint("API_PAGE_SIZE", 100, minimum=1)
API_MAX_PAGE_SIZE = envint("API_MAX_PAGE_SIZE", 1000, minimum=1)
# How long a JWT access token and its refresh token last.
JWT_ACCESS_LIFETIME = envduration("JWT_ACCESS_LIFETIME", "15m")
JWT_REFRESH_LIFETIME = envduration("JWT_REFRESH_LIFETIME", "1d")
# Host names (or IP addresses) the user import may fetch a list of users from
# (POST /api/devices/{id}/users/import/ with a url); empty allows none.
USER_IMPORT_ALLOWED_HOSTS = envlist("USER_IMPORT_ALLOWED_HOSTS", [])
# A slow or huge answer must not hold a web worker or fill its memory.
USER_IMPORT_TIMEOUT_SECONDS = envfloat("USER_IMPORT_TIMEOUT_SECONDS", 10, minimum=0.1)
USER_IMPORT_MAX_BYTES = envint("USER_IMPORT_MAX_BYTES", 1_000_000, minimum=1)

REST_FRAMEWORK = {
    # Token first: an anonymous request is then answered 401 with a
    # WWW-Authenticate header, not 403.
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.TokenAuthentication",
        "rest_framework_simplejwt.authentication.JWTAuthentication",
        "rest_framework.authentication.SessionAuthentication",
        "core.api.authentication.OptionalBasicAuthentication",
    ],
    # Every endpoint needs a login and the Django permission its action
    # declares (core.api.permissions).
    "DEFAULT_PERMISSION_CLASSES": ["core.api.permissions.ActionPermissions"],
    "DEFAULT_FILTER_BACKENDS": ["django_filters.rest_framework.DjangoFilterBackend"],
    "DEFAULT_PAGINATION_CLASS": "core.api.pagination.Pagination",
    "PAGE_SIZE": API_PAGE_SIZE,
    "DEFAULT_THROTTLE_CLASSES": [
        "core.api.throttling.AnonThrottle",
        "core.api.throttling.UserThrottle",
    ],
    "DEFAULT_RENDERER_CLASSES": [
        "rest_framework.renderers.JSONRenderer",
        "rest_framework.renderers.BrowsableAPIRenderer",
    ],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "core.api.errors.exception_handler",
}

SIMPLE_JWT = {
    "ACCESS_TOKEN_LIFETIME": JWT_ACCESS_LIFETIME,
    "REFRESH_TOKEN_LIFETIME": JWT_REFRESH_LIFETIME,
    "UPDATE_LAST_LOGIN": True,
}

SPECTACULAR_SETTINGS = {
    "TITLE": "Attendance Bridge API",
    "DESCRIPTION": (
        "Devices, the users on them, raw punches and daily clock-in/clock-out records. "
        "Every endpoint needs a login and a Django permission: see docs/api.md."
    ),
    "VERSION": "0.1.0",
    "SERVE_PERMISSIONS": ["rest_framework.permissions.IsAuthenticated"],
    # Request and response bodies as separate components, so write-only fields
    # (a device's comm key) are never shown in a response.
    "COMPONENT_SPLIT_REQUEST": True,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "ENUM_NAME_OVERRIDES": {
        "SyncStateEnum": "core.models.ProcessedAttendance.SyncState",
        "PunchStateEnum": "core.models.RawAttendance.PunchState",
        "CommandStateEnum": "core.models.DeviceCommand.State",
    },
}


# --- Audit log (core.audit, django-auditlog) ---------------------------------------------

# Before/after values stored as JSON (numbers, booleans and nulls keep their
# type) rather than as text.
AUDITLOG_STORE_JSON_CHANGES = True
# The models whose saves and deletes auditlog's signals record; core.audit
# records the set-based changes itself. A device's polling state is written
# by polls, never by a person (its observed facts are named once, in
# core.device_facts, for Device.OBSERVED_FIELDS and here); its comm key shows
# only as set or not set. Reverse relations are left out, or a create would
# list them as changed.
AUDITLOG_INCLUDE_TRACKING_MODELS = (
    {
        "model": "core.device",
        "exclude_fields": [
            *DEVICE_OBSERVED_FIELDS,
            "last_record_count",
            "last_serial_number",
            "created_at",
            "updated_at",
            "punches",
            "employees",
        ],
        "mask_fields": ["comm_key"],
        "mask_callable": "core.audit.mask_secret",
    },
    {
        "model": "core.employee",
        "exclude_fields": ["created_at", "updated_at", "days"],
        "m2m_fields": ["devices"],
    },
)


# --- Logging -------------------------------------------------------------------------
# One line per poll, processing run and delivery batch (core.ingest,
# core.processing, core.crm), on stderr; JSON lines for a log collector with
# LOG_FORMAT=json; also into a rotating file with LOG_FILE. Web, worker and
# beat may share one LOG_FILE: the handler takes a file lock to rotate it.

LOG_LEVEL = envstr("LOG_LEVEL", "INFO").upper()
if LOG_LEVEL not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
    raise ImproperlyConfigured(
        f"LOG_LEVEL must be DEBUG, INFO, WARNING, ERROR or CRITICAL, got {LOG_LEVEL!r}"
    )
# plain: "time LEVEL logger: message"; json: one JSON object per line.
LOG_FORMAT = envstr("LOG_FORMAT", "plain").strip().lower()
if LOG_FORMAT not in ("plain", "json"):
    raise ImproperlyConfigured(f"LOG_FORMAT must be plain or json, got {LOG_FORMAT!r}")
# A file that gets every log line too (relative to the project folder); empty: none.
LOG_FILE = envstr("LOG_FILE", "").strip()
# The file is rotated at this size, keeping this many old files.
LOG_FILE_MAX_MB = envint("LOG_FILE_MAX_MB", 50, minimum=1)
LOG_FILE_BACKUPS = envint("LOG_FILE_BACKUPS", 5, minimum=1)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"},
        "json": {
            "()": "pythonjsonlogger.json.JsonFormatter",
            "format": "%(asctime)s %(levelname)s %(name)s %(message)s",
            "rename_fields": {"asctime": "time", "levelname": "level", "name": "logger"},
        },
    },
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": LOG_FORMAT},
    },
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        "django.db.backends": {"level": "INFO"},
    },
}
if LOG_FILE:
    _log_file = BASE_DIR / LOG_FILE
    _log_file.parent.mkdir(parents=True, exist_ok=True)
    LOGGING["handlers"]["file"] = {
        "class": "concurrent_log_handler.ConcurrentRotatingFileHandler",
        "formatter": LOG_FORMAT,
        "filename": str(_log_file),
        "maxBytes": LOG_FILE_MAX_MB * 1024 * 1024,
        "backupCount": LOG_FILE_BACKUPS,
    }
    LOGGING["root"]["handlers"].append("file")


# --- Operations: health, metrics, heartbeat -------------------------------------------

# The bearer token a Prometheus scraper sends to GET /metrics; empty: /metrics
# answers 404 (it is never open).
METRICS_TOKEN = envstr("METRICS_TOKEN", "")
# Seconds between heartbeats: beat queues core.tasks.heartbeat, a worker runs
# it and records the time, so a fresh heartbeat proves beat, broker, worker and
# database all work. /health/ fails when the last is older than five intervals.
HEARTBEAT_INTERVAL_SECONDS = envint("HEARTBEAT_INTERVAL_SECONDS", 60, minimum=5)
# An enabled device with no successful poll for this many minutes is overdue
# (/health/ fails, the status page counts it); default three poll intervals.
DEVICE_OVERDUE_MINUTES = envfloat("DEVICE_OVERDUE_MINUTES", 3 * POLL_INTERVAL_MINUTES, minimum=0.1)
# collectstatic fills it; made here so WhiteNoise finds it before the first run.
STATIC_ROOT.mkdir(parents=True, exist_ok=True)
# Beat keeps its schedule state beside the other runtime files.
CELERY_BEAT_SCHEDULE_FILENAME = str(VAR_DIR / "celerybeat-schedule")
CELERY_BEAT_SCHEDULE["heartbeat"] = {
    "task": "core.tasks.heartbeat",
    "schedule": float(HEARTBEAT_INTERVAL_SECONDS),
    # A heartbeat that waited longer than an interval is stale: drop it.
    "options": {"expires": float(HEARTBEAT_INTERVAL_SECONDS)},
}
