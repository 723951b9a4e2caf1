"""Settings fail fast, naming the variable, when the environment is badly set."""

import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[2]


def load_settings(
    script: str = "import attendance_bridge.settings", *, argv: tuple[str, ...] = (), **env
) -> subprocess.CompletedProcess:
    environment = {"SECRET_KEY": "x", "PATH": "/usr/bin:/bin", "VAR_DIR": "/tmp/ab-settings-test"}
    environment.update(env)
    return subprocess.run(
        [sys.executable, "-c", script, *argv],
        cwd=PROJECT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("MAX_SHIFT_HOURS", "ten", "MAX_SHIFT_HOURS must be a whole number, got 'ten'"),
        ("DEBUG", "maybe", "DEBUG must be true or false, got 'maybe'"),
        ("WORK_START_TIME", "8am", "WORK_START_TIME must be a time like 08:00, got '8am'"),
        ("DEVICE_DEFAULT_TIMEZONE", "Lisbon", "must be an IANA time zone name"),
        ("LOG_LEVEL", "loud", "LOG_LEVEL must be DEBUG, INFO"),
        ("FULL_POLL_HOURS", "0", "FULL_POLL_HOURS must be at least 1, got 0"),
        ("CRM_API_URL", "crm.example.com", "CRM_API_URL must start with http:// or https://"),
        ("CRM_AUTH_SCHEME", "Basic", "CRM_AUTH_SCHEME must be Token or Bearer, got 'Basic'"),
        ("CRM_SYNC_FROM", "last year", "CRM_SYNC_FROM must be a date like 2026-01-01"),
        ("CRM_BATCH_SIZE", "0", "CRM_BATCH_SIZE must be at least 1, got 0"),
        ("CRM_READ_TIMEOUT_SECONDS", "soon", "CRM_READ_TIMEOUT_SECONDS must be a number"),
        ("API_THROTTLE_RATE", "lots", "API_THROTTLE_RATE must be a count and a period"),
        ("API_AUTH_THROTTLE_RATE", "5/fortnight", "API_AUTH_THROTTLE_RATE must be a count"),
        ("API_BASIC_AUTH", "sometimes", "API_BASIC_AUTH must be true or false"),
        ("USER_IMPORT_MAX_BYTES", "0", "USER_IMPORT_MAX_BYTES must be at least 1, got 0"),
        ("CACHE_URL", "memcached://127.0.0.1:11211/1", "CACHE_URL must be a Redis URL"),
        ("CACHE_URL", "redis://127.0.0.1:6379", "with a database number"),
        ("CACHE_URL", "redis://127.0.0.1:port/1", "got 'redis://127.0.0.1:port/1'"),
    ],
)
def test_a_bad_value_stops_start_up_with_a_message_naming_the_variable(variable, value, message):
    result = load_settings(**{variable: value})
    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr
    assert message in result.stderr


def test_without_a_secret_key_start_up_stops_unless_debug():
    assert "SECRET_KEY is not set" in load_settings(SECRET_KEY="").stderr
    assert load_settings(SECRET_KEY="", DEBUG="true").returncode == 0


def test_a_bad_cache_url_is_shown_without_its_password():
    result = load_settings(CACHE_URL="redis://:hunter2@127.0.0.1:6379/cache")
    assert "got 'redis://127.0.0.1:6379/cache'" in result.stderr
    assert "hunter2" not in result.stderr


def test_a_redis_cache_url_makes_redis_the_cache():
    script = "from attendance_bridge import settings as s; print(s.CACHES['default'])"
    url = "rediss://:hunter2@cache.example.com:6380/3"
    result = load_settings(script, CACHE_URL=url)
    assert "'django.core.cache.backends.redis.RedisCache'" in result.stdout
    assert f"'LOCATION': '{url}'" in result.stdout


def test_embedded_defaults_need_no_database_broker_or_cache_server():
    script = (
        "from attendance_bridge import settings as s; "
        "print(s.DATABASES['default']['ENGINE'], s.CELERY_BROKER_URL, "
        "s.CACHES['default']['BACKEND'], s.CACHES['default']['LOCATION'])"
    )
    # Set and empty, so that a developer's .env cannot fill them in.
    result = load_settings(script, DATABASE_URL="", CELERY_BROKER_URL="", CACHE_URL="")
    assert result.stdout.split() == [
        "django.db.backends.sqlite3",
        "filesystem://",
        "django.core.cache.backends.filebased.FileBasedCache",
        "/tmp/ab-settings-test/cache",
    ]


def test_a_crm_token_and_a_token_file_together_stop_start_up():
    result = load_settings(CRM_API_TOKEN="t", CRM_API_TOKEN_FILE="/run/secrets/crm")
    assert "Set CRM_API_TOKEN or CRM_API_TOKEN_FILE, not both" in result.stderr


SQLITE_WRITER_RACE = """
import sqlite3, threading, time
import django
django.setup()
from django.db import connection, transaction

with connection.cursor() as cursor:
    cursor.execute("CREATE TABLE race (x INTEGER)")
path = connection.settings_dict["NAME"]
holding = threading.Event()

def other_process():
    # Another process writes and holds its lock for a moment, as a worker does.
    other = sqlite3.connect(path, timeout=20, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO race VALUES (1)")
    holding.set()
    time.sleep(0.5)
    other.execute("COMMIT")

thread = threading.Thread(target=other_process)
thread.start()
holding.wait()
with transaction.atomic():  # reads, then writes: the shape of a poll
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM race")
        cursor.execute("INSERT INTO race VALUES (2)")
thread.join()
with connection.cursor() as cursor:
    cursor.execute("SELECT count(*) FROM race")
    print("rows", cursor.fetchone()[0])
"""


def test_a_sqlite_transaction_that_reads_then_writes_waits_for_another_writer(tmp_path):
    result = load_settings(
        SQLITE_WRITER_RACE,
        DJANGO_SETTINGS_MODULE="attendance_bridge.settings",
        DATABASE_URL="",
        VAR_DIR=str(tmp_path),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "rows 2" in result.stdout


LOGINS = """
import sys
import django
django.setup()
from django.test import Client

# An empty login is refused (400) without a database, and counts all the same.
client = Client(REMOTE_ADDR=sys.argv[1], HTTP_HOST="localhost")
print(*(client.post("/api/auth/token/").status_code for _ in range(int(sys.argv[2]))))
"""


@pytest.mark.parametrize("cache_url", ["", "redis://127.0.0.1:6379/11"], ids=["files", "redis"])
def test_the_login_limit_is_counted_across_processes_and_restarts(cache_url, tmp_path):
    if cache_url:
        try:
            socket.create_connection(("127.0.0.1", 6379), timeout=1).close()
        except OSError:
            pytest.skip("no Redis on 127.0.0.1:6379")
    # An address of its own, so a count left in Redis by an earlier run is not this one.
    address = f"10.{random.randrange(256)}.{random.randrange(256)}.{random.randrange(256)}"

    def logins(count: int) -> list[str]:
        result = load_settings(
            LOGINS,
            argv=(address, str(count)),
            DJANGO_SETTINGS_MODULE="attendance_bridge.settings",
            DATABASE_URL="",
            CELERY_BROKER_URL="",
            VAR_DIR=str(tmp_path),
            CACHE_URL=cache_url,
            API_AUTH_THROTTLE_RATE="3/minute",
        )
        assert result.returncode == 0, result.stderr[-2000:]
        return result.stdout.split()

    # Two web processes, one after the other: the second sees the first one's count.
    assert logins(2) == ["400", "400"]
    assert logins(2) == ["400", "429"]
