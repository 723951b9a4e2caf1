"""Delivery to the CRM, against the fake CRM over loopback (real HTTP)."""

import datetime
import hashlib
import hmac
import json
import threading
import time
from pathlib import Path

import pytest
import requests
import time_machine
from django.core.management import CommandError, call_command
from django.db import connection
from django.db.models import F

from core.crm import (
    JsonContractDestination,
    crm_check,
    crm_resend,
    crm_reset_failed,
    crm_retry_failed,
    crm_stats,
    crm_sync,
    sign,
)
from core.models import Counter, DeliveryLog, ProcessedAttendance
from core.tests.factories import DeviceFactory, EmployeeFactory

pytestmark = pytest.mark.django_db(transaction=True)

State = ProcessedAttendance.SyncState
UTC = datetime.UTC
FIRST_DAY = datetime.date(2026, 11, 2)


def make_days(count: int, *, users: int = 10, device=None, first_day=FIRST_DAY) -> list[int]:
    """`count` pending daily records, spread over `users` employees; returns their ids."""
    device = device or DeviceFactory(timezone="Europe/Lisbon")
    employees = [EmployeeFactory(user_id=str(1001 + n)) for n in range(users)]
    rows = []
    for n in range(count):
        employee = employees[n % users]
        day = first_day + datetime.timedelta(days=n // users)
        clock_in = datetime.datetime.combine(day, datetime.time(8, 0), tzinfo=UTC)
        rows.append(
            ProcessedAttendance(
                user_id=employee.user_id,
                employee=employee,
                work_date=day,
                clock_in=clock_in,
                clock_out=clock_in + datetime.timedelta(hours=9, minutes=30),
                clock_in_device=device,
                clock_out_device=device,
                punch_count=2,
                worked=datetime.timedelta(hours=9, minutes=30),
            )
        )
    ProcessedAttendance.objects.bulk_create(rows)
    return list(ProcessedAttendance.objects.order_by("pk").values_list("pk", flat=True))


@pytest.fixture
def crm(fake_crm, settings):
    """A fake CRM wanting a token, and the settings pointing at it; fast backoff."""
    server = fake_crm(token="secret-token")
    settings.CRM_API_URL = server.url
    settings.CRM_API_TOKEN = "secret-token"
    settings.CRM_RETRY_BACKOFF_SECONDS = 0.001
    settings.CRM_READ_TIMEOUT_SECONDS = 5
    settings.CRM_BATCH_SIZE = 20
    return server


def states() -> dict[str, int]:
    return {
        state: ProcessedAttendance.objects.filter(sync_state=state).count()
        for state in State.values
        if ProcessedAttendance.objects.filter(sync_state=state).exists()
    }


def held_versions(server) -> dict[str, int]:
    return {external_id: record["version"] for external_id, record in server.held().items()}


class Hooked(JsonContractDestination):
    """The real JSON destination with something happening around a request."""

    def __init__(self, *, before=None, after=None, **kwargs):
        super().__init__(**kwargs)
        self.before, self.after = before, after

    def send(self, *, records, key):
        if self.before:
            self.before(records, key)
        answer = super().send(records=records, key=key)
        if self.after:
            self.after(records, key)
        return answer


def hooked(server, **hooks) -> Hooked:
    return Hooked(url=server.url, token="secret-token", **hooks)


class Crash(BaseException):
    """The process dying: not an Exception, nothing in the bridge catches it."""


# --- The happy path and the contract -------------------------------------------------------


def test_every_pending_row_reaches_the_crm_once_and_becomes_synced(crm):
    ids = make_days(45)
    result = crm_sync()
    assert (result.sent, result.failed, result.rejected) == (45, 0, 0)
    assert result.batches == 3 and result.requests == 3
    assert states() == {"synced": 45}
    assert ProcessedAttendance.objects.filter(synced_version=F("version")).count() == 45
    assert ProcessedAttendance.objects.exclude(delivery_key="").count() == 0
    assert len(crm.held()) == 45
    stats = crm.state.stats
    assert (stats.records_received, stats.records_applied, stats.records_redelivered) == (45, 45, 0)
    # Nothing is due any more: a second run sends nothing.
    again = crm_sync()
    assert (again.sent, again.requests) == (0, 0)
    assert ProcessedAttendance.objects.get(pk=ids[0]).sync_attempts == 1


def test_a_record_follows_the_contract_with_times_in_the_device_zone(crm):
    make_days(1)
    row = ProcessedAttendance.objects.get()
    row.outlier_reasons = [{"code": "late_clock_out", "message": "late_clock_out: ..."}]
    row.is_outlier = True
    row.save()
    crm_sync()
    record = crm.held()[f"{row.user_id}:2026-11-02"]
    assert record == {
        "external_id": f"{row.user_id}:2026-11-02",
        "version": 1,
        "user_id": row.user_id,
        "employee_name": row.employee.name,
        "work_date": "2026-11-02",
        # 08:00 UTC in Lisbon in November (WET, +00:00); 17:30 out.
        "clock_in": "2026-11-02T08:00:00+00:00",
        "clock_out": "2026-11-02T17:30:00+00:00",
        "clock_in_device": row.clock_in_device.name,
        "clock_out_device": row.clock_out_device.name,
        "punch_count": 2,
        "worked_minutes": 570,
        "is_outlier": True,
        "outlier_reasons": ["late_clock_out"],
        "is_manual": False,
    }


def test_clock_times_carry_the_utc_offset_of_the_device_zone(crm):
    make_days(1, device=DeviceFactory(timezone="Asia/Tokyo"))
    crm_sync()
    (record,) = crm.held().values()
    assert record["clock_in"] == "2026-11-02T17:00:00+09:00"
    assert record["clock_out"] == "2026-11-03T02:30:00+09:00"


def test_requests_carry_the_token_an_idempotency_key_and_the_envelope(fake_crm, settings):
    seen = []

    class Capture(JsonContractDestination):
        def headers(self, *, body, key):
            headers = super().headers(body=body, key=key)
            seen.append(({**self.session.headers, **headers}, json.loads(body)))
            return headers

    server = fake_crm(token="t0k")
    make_days(3)
    crm_sync(
        destination=Capture(
            url=server.url, token="t0k", auth_scheme="Bearer", bridge_name="plant-7"
        )
    )
    ((headers, body),) = seen
    assert headers["Authorization"] == "Bearer t0k"
    assert len(headers["Idempotency-Key"]) == 64
    assert body["source"]["bridge"] == "plant-7"
    assert datetime.datetime.fromisoformat(body["source"]["sent_at"]).tzinfo is not None
    assert len(body["records"]) == 3
    assert server.keys_seen() == [headers["Idempotency-Key"]]


def test_the_signature_verifies_with_the_shared_secret(fake_crm, settings):
    server = fake_crm(signing_secret="s3cret")
    settings.CRM_API_URL = server.url
    settings.CRM_SIGNING_SECRET = "s3cret"
    make_days(5)
    assert crm_sync().sent == 5
    assert len(server.held()) == 5

    # The check docs/crm-contract.md gives a CRM, on a body the bridge signed.
    doc = (Path(__file__).resolve().parents[2] / "docs" / "crm-contract.md").read_text()
    snippet = doc.split("```python\n")[1].split("```")[0]
    namespace: dict = {}
    exec(snippet, namespace)
    signature_ok = namespace["signature_ok"]
    destination = JsonContractDestination(url=server.url, signing_secret="s3cret")
    body = destination.body([])
    headers = destination.headers(body=body, key="k")
    stamp, signature = headers["X-Signature-Timestamp"], headers["X-Signature"]
    assert signature_ok(b"s3cret", body, stamp, signature)
    assert not signature_ok(b"s3cret", body + b" ", stamp, signature)
    assert not signature_ok(b"other", body, stamp, signature)
    expected = hmac.new(b"s3cret", stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    assert (
        signature
        == f"sha256={expected}"
        == "sha256=" + sign(secret="s3cret", timestamp=stamp, body=body)
    )


def test_a_wrong_signing_secret_is_refused_like_bad_credentials(fake_crm, settings):
    server = fake_crm(signing_secret="s3cret")
    settings.CRM_API_URL = server.url
    settings.CRM_SIGNING_SECRET = "not-it"
    make_days(5)
    result = crm_sync()
    assert result.credentials_refused and result.sent == 0
    assert server.held() == {}
    assert server.state.stats.unauthorized == 1


def test_the_token_can_come_from_a_file(crm, settings, tmp_path):
    secret = tmp_path / "token"
    secret.write_text("secret-token\n")
    settings.CRM_API_TOKEN = ""
    settings.CRM_API_TOKEN_FILE = str(secret)
    make_days(2)
    assert crm_sync().sent == 2


def test_an_unreadable_token_file_is_a_clear_error(crm, settings, tmp_path):
    settings.CRM_API_TOKEN = ""
    settings.CRM_API_TOKEN_FILE = str(tmp_path / "missing")
    make_days(2)
    with pytest.raises(CommandError, match="Cannot read CRM_API_TOKEN_FILE .*missing"):
        call_command("sync_to_crm")
    assert states() == {"pending": 2}


def test_a_missing_ca_bundle_is_a_clear_error(crm, settings, tmp_path):
    settings.CRM_CA_BUNDLE = str(tmp_path / "company-ca.pem")
    with pytest.raises(CommandError, match="CRM_CA_BUNDLE .*company-ca.pem is not a file"):
        call_command("sync_to_crm")


def test_a_ca_bundle_is_what_requests_verifies_against(tmp_path, monkeypatch):
    bundle = tmp_path / "ca.pem"
    bundle.write_text("-----BEGIN CERTIFICATE-----\n")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/from/the/environment.pem")
    destination = JsonContractDestination(url="https://127.0.0.1:1/", ca_bundle=str(bundle))
    assert destination.session.verify == str(bundle)
    # Without one, the environment's bundle (read once), else the public ones.
    assert (
        JsonContractDestination(url="https://127.0.0.1:1/").session.verify
        == "/from/the/environment.pem"
    )
    monkeypatch.delenv("REQUESTS_CA_BUNDLE")
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    assert JsonContractDestination(url="https://127.0.0.1:1/").session.verify is True


def test_proxy_settings_of_the_environment_are_read_once_and_kept(monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    monkeypatch.setenv("NO_PROXY", "crm.internal")
    outside = JsonContractDestination(url="https://crm.example.com/import")
    inside = JsonContractDestination(url="https://crm.internal/import")
    monkeypatch.delenv("HTTPS_PROXY")
    assert outside.session.proxies.get("https") == "http://proxy.example:3128"
    assert not outside.session.trust_env
    assert "https" not in inside.session.proxies


def test_without_a_crm_url_push_is_off(settings):
    settings.CRM_API_URL = ""
    with pytest.raises(CommandError, match="Push to the CRM is off: CRM_API_URL is not set"):
        call_command("sync_to_crm")


def test_days_before_crm_sync_from_are_never_pushed(crm, settings):
    make_days(30, users=10)  # 2026-11-02, 03, 04
    settings.CRM_SYNC_FROM = datetime.date(2026, 11, 4)
    result = crm_sync()
    assert result.sent == 10
    assert {record["work_date"] for record in crm.held().values()} == {"2026-11-04"}
    assert ProcessedAttendance.objects.filter(sync_state=State.PENDING).count() == 20


# --- Transient failures --------------------------------------------------------------------


def test_a_500_is_retried_under_the_same_key_and_then_delivered(crm):
    make_days(10)
    crm.script.extend(["500"])
    result = crm_sync()
    assert (result.sent, result.requests) == (10, 2)
    logs = list(DeliveryLog.objects.order_by("pk"))
    assert [(log.status_code, log.outcome) for log in logs] == [
        (500, "transient"),
        (200, "acknowledged"),
    ]
    assert logs[0].idempotency_key == logs[1].idempotency_key
    assert "Injected server error" in logs[0].response_excerpt
    assert ProcessedAttendance.objects.filter(sync_attempts=2).count() == 10


def test_a_timeout_is_retried_and_then_delivered(crm, settings):
    settings.CRM_READ_TIMEOUT_SECONDS = 0.3
    crm.stall_seconds = 1.5
    make_days(5)
    crm.script.extend(["stall"])
    result = crm_sync()
    assert (result.sent, result.requests) == (5, 2)
    first = DeliveryLog.objects.order_by("pk").first()
    assert first.status_code is None and "No answer in time" in first.error


def test_a_dropped_connection_after_storing_is_resent_and_stored_once(crm):
    make_days(10)
    crm.script.extend(["drop-after"])
    result = crm_sync()
    assert (result.sent, result.requests) == (10, 2)
    assert "Connection failed" in DeliveryLog.objects.order_by("pk").first().error
    stats = crm.state.stats
    assert (stats.replays, stats.records_applied, stats.records_redelivered) == (1, 10, 0)
    (key,) = set(crm.keys_seen())
    assert crm.keys_seen() == [key, key]


def test_a_429_waits_at_least_its_retry_after(crm):
    make_days(4)
    crm.script.extend(["429"])
    waits = []

    def sleep(seconds):
        waits.append(seconds)
        time.sleep(seconds)

    started = time.monotonic()
    result = crm_sync(sleep=sleep)
    assert result.sent == 4 and result.requests == 2
    assert waits and waits[0] >= 1.0
    assert time.monotonic() - started >= 1.0


def test_a_retry_after_beyond_the_cap_fails_the_batch_until_then(crm, settings):
    settings.CRM_RETRY_MAX_WAIT_SECONDS = 0.5
    make_days(4)
    crm.script.extend(["429"])
    before = datetime.datetime.now(UTC)
    result = crm_sync()
    assert (result.failed, result.requests) == (4, 1)
    assert "more than CRM_RETRY_MAX_WAIT_SECONDS" in result.stopped
    row = ProcessedAttendance.objects.first()
    assert row.next_sync_at >= before + datetime.timedelta(hours=6)


def test_retries_run_out_then_rows_fail_with_the_error_and_come_back_later(crm, settings):
    settings.CRM_MAX_RETRIES = 2
    make_days(30)  # batches of 20: the first fails, the run stops
    crm.script.extend(["500", "500", "500"])
    result = crm_sync()
    assert (result.sent, result.failed, result.requests) == (0, 20, 3)
    assert "the CRM is unavailable" in result.stopped
    assert states() == {"failed": 20, "pending": 10}
    failed = ProcessedAttendance.objects.filter(sync_state=State.FAILED).first()
    assert failed.sync_attempts == 3
    assert "HTTP 500" in failed.last_sync_error and "3 attempts" in failed.last_sync_error
    assert failed.crm_status == 500

    # The next run sends the pending rows and leaves the failed ones to their time.
    assert crm_sync().sent == 10
    assert states() == {"failed": 20, "synced": 10}
    with time_machine.travel(failed.next_sync_at + datetime.timedelta(seconds=1), tick=True):
        assert crm_sync().sent == 20
    assert states() == {"synced": 30}
    # Each booking added its rows to the totals of /metrics.
    totals = dict(Counter.objects.filter(name="delivered_daily").values_list("outcome", "value"))
    assert totals == {"sent": 30, "failed": 20, "rejected": 0}


def test_a_failed_batch_sent_again_later_goes_under_its_first_key(crm, settings):
    settings.CRM_MAX_RETRIES = 1
    ids = make_days(6)
    # Stored, but both answers lost: the rows fail, yet the CRM holds them.
    crm.script.extend(["drop-after", "drop-after"])
    assert crm_sync().failed == 6
    assert crm_reset_failed(ids=ids) == 6
    assert crm_sync().sent == 6
    (key,) = set(crm.keys_seen())
    assert crm.keys_seen() == [key, key, key]
    stats = crm.state.stats
    assert (stats.records_applied, stats.replays, stats.records_redelivered) == (6, 2, 0)


def test_a_row_recomputed_between_claim_and_read_waits_for_a_later_batch(crm):
    from core.crm import _claim, _claimed, _Config

    ids = make_days(3)
    ((key, _rows, _records),) = _claim(
        limit=10, config=_Config.load(sleep=time.sleep, batch_size=None)
    )
    ProcessedAttendance.objects.filter(pk=ids[1]).update(version=F("version") + 1)
    assert [row["pk"] for row in _claimed(key)] == [ids[0], ids[2]]
    assert ProcessedAttendance.objects.get(pk=ids[1]).delivery_key == ""


def test_reset_failed_makes_failed_rows_due_now(crm, settings):
    settings.CRM_MAX_RETRIES = 0
    ids = make_days(3)
    crm.script.extend(["500"])
    crm_sync()
    assert crm_retry_failed() == 0  # their time has not come
    assert crm_reset_failed(ids=ids) == 3
    assert crm_sync().sent == 3


def test_unreachable_crm_fails_the_batch_with_the_connection_error(settings):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings.CRM_API_URL = f"http://127.0.0.1:{port}/records"
    settings.CRM_RETRY_BACKOFF_SECONDS = 0.001
    settings.CRM_MAX_RETRIES = 1
    make_days(3)
    result = crm_sync()
    assert result.failed == 3
    assert "Connection failed" in ProcessedAttendance.objects.first().last_sync_error


# --- Refusals ------------------------------------------------------------------------------


def test_a_401_stops_the_run_at_once_and_leaves_the_rows_as_they_were(crm, settings):
    settings.CRM_API_TOKEN = "wrong"
    make_days(50)
    result = crm_sync()
    assert result.credentials_refused and result.requests == 1
    assert "refused the credentials (HTTP 401)" in result.stopped
    assert states() == {"pending": 50}
    assert not ProcessedAttendance.objects.filter(sync_attempts__gt=0).exists()
    assert not ProcessedAttendance.objects.exclude(delivery_key="").exists()
    with pytest.raises(CommandError, match="check CRM_API_TOKEN"):
        call_command("sync_to_crm")


def test_a_refused_batch_goes_one_by_one_and_only_the_bad_record_is_rejected(crm, settings):
    crm.reject_user_ids = {"1003"}
    make_days(10, users=10)
    result = crm_sync()
    assert (result.sent, result.rejected) == (9, 1)
    rejected = ProcessedAttendance.objects.get(sync_state=State.REJECTED)
    assert rejected.user_id == "1003"
    assert rejected.crm_status == 422
    assert "user 1003 is not known to this CRM" in rejected.crm_response
    assert "refused this record" in rejected.last_sync_error
    assert "1003:2026-11-02" not in crm.held() and len(crm.held()) == 9
    assert DeliveryLog.objects.filter(status_code=400, records=10).count() == 1
    # Each single under a key of its own: the key of its content.
    singles = DeliveryLog.objects.filter(records=1)
    assert singles.count() == 10
    assert len({log.idempotency_key for log in singles}) == 10

    # Not retried until it changes...
    assert crm_sync().requests == 0
    # ...or someone resends it.
    assert crm_resend(ids=[rejected.pk]) == 1
    crm.reject_user_ids = set()
    assert crm_sync().sent == 1
    assert len(crm.held()) == 10


# --- Nothing lost, nothing doubled ---------------------------------------------------------


def test_a_row_recomputed_while_in_flight_is_sent_again_at_its_new_version(crm):
    ids = make_days(5)
    bumped = []

    def recompute_one(records, key):
        if not bumped:
            # What processing does to a changed row, committed mid-request.
            ProcessedAttendance.objects.filter(pk=ids[2]).update(
                version=F("version") + 1,
                punch_count=3,
                sync_state=State.PENDING,
                sync_attempts=0,
                next_sync_at=None,
            )
            bumped.append(ids[2])

    result = crm_sync(destination=hooked(crm, before=recompute_one))
    assert result.sent == 5 and result.superseded == 1
    row = ProcessedAttendance.objects.get(pk=ids[2])
    assert (row.version, row.synced_version, row.sync_state) == (2, 2, State.SYNCED)
    record = crm.held()[f"{row.user_id}:{row.work_date}"]
    assert (record["version"], record["punch_count"]) == (2, 3)
    assert result.requests == 2


def test_a_row_resent_while_in_flight_goes_again_under_a_new_key(crm):
    ids = make_days(5)
    resent = []

    def resend_one(records, key):
        if not resent:
            # The admin's Resend, committed while the batch's request is on its way.
            assert crm_resend(ids=[ids[2]]) == 1
            resent.append(ids[2])

    result = crm_sync(destination=hooked(crm, before=resend_one))
    assert result.sent == 5 and result.superseded == 1
    row = ProcessedAttendance.objects.get(pk=ids[2])
    assert (row.sync_state, row.synced_version, row.resend_count) == (State.SYNCED, 1, 1)
    assert row.delivery_key == "" and row.delivery_version is None
    # The Resend was a request of its own: that row alone, under a key of its own.
    from core.crm import content_key

    assert result.requests == 2
    assert crm.keys_seen()[1] == content_key([{"pk": ids[2], "version": 1, "resend_count": 1}])


def test_a_claim_takes_only_unclaimed_due_rows(crm):
    from core.crm import _claim, _Config

    make_days(30)
    config = _Config.load(sleep=time.sleep, batch_size=None)
    ((first, first_rows, _),) = _claim(limit=20, config=config)
    ((second, second_rows, _),) = _claim(limit=20, config=config)
    counts = [ProcessedAttendance.objects.filter(delivery_key=k).count() for k in (first, second)]
    assert counts == [20, 10] and (len(first_rows), len(second_rows)) == (20, 10)
    assert not {r["pk"] for r in first_rows} & {r["pk"] for r in second_rows}
    assert _claim(limit=20, config=config) == []
    row = ProcessedAttendance.objects.get(pk=ProcessedAttendance.objects.order_by("pk")[0].pk)
    assert (row.delivery_version, row.sync_state) == (row.version, State.PENDING)
    assert row.last_sync_attempt is not None


def test_two_sync_runs_at_once_send_each_row_once(crm, settings):
    if connection.vendor == "sqlite" and connection.is_in_memory_db():
        # The in-memory test database shares one cache between threads, whose
        # table locks fail at once instead of waiting as a database file does.
        pytest.skip("needs PostgreSQL or a SQLite file, not the in-memory test database")
    crm.latency_ms = 30
    settings.CRM_BATCH_SIZE = 10
    make_days(200, users=20)
    results, errors = [], []

    def run():
        try:
            results.append(crm_sync())
        except Exception as exc:  # reported below, with the thread's error
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    assert len(results) == 2 and sum(r.sent for r in results) == 200
    assert all(r.sent > 0 for r in results), "both runs should have sent a share"
    stats = crm.state.stats
    assert (stats.records_received, stats.records_applied, stats.records_ignored) == (200, 200, 0)
    assert states() == {"synced": 200}


def test_a_crash_after_the_post_resends_the_batch_under_the_same_key(crm):
    ids = make_days(8)

    def die(records, key):
        raise Crash

    with pytest.raises(Crash):
        crm_sync(destination=hooked(crm, after=die))
    (key,) = crm.keys_seen()
    assert len(crm.held()) == 8  # the CRM has them; the bridge never heard
    assert ProcessedAttendance.objects.filter(delivery_key=key).count() == 8
    # A row changed since the crash leaves the old batch for a new one.
    ProcessedAttendance.objects.filter(pk=ids[0]).update(
        version=F("version") + 1, sync_state=State.PENDING
    )

    # While the lease runs, another run leaves the batch alone.
    assert crm_sync().requests == 0
    lease_end = ProcessedAttendance.objects.get(pk=ids[1]).delivery_lease_until
    with time_machine.travel(lease_end + datetime.timedelta(seconds=1), tick=True):
        result = crm_sync()
    assert result.replayed_batches == 1 and result.sent == 8
    seen = crm.keys_seen()
    assert seen[:2] == [key, key] and len(seen) == 3 and seen[2] != key
    assert crm.state.stats.replays == 1 and crm.state.stats.records_redelivered == 0
    assert states() == {"synced": 8}
    changed = ProcessedAttendance.objects.get(pk=ids[0])
    assert held_versions(crm)[f"{changed.user_id}:{changed.work_date}"] == 2


def test_no_request_is_made_inside_a_database_transaction(crm):
    from django.db import transaction

    make_days(2)
    with pytest.raises(RuntimeError, match="inside a database transaction"):
        with transaction.atomic():
            crm_sync()
    assert crm.state.stats.requests == 0


def test_limit_bounds_the_rows_sent(crm):
    make_days(50)
    assert crm_sync(limit=25).sent == 25
    assert states() == {"synced": 25, "pending": 25}


# --- Pacing, log, commands -----------------------------------------------------------------


def test_requests_are_paced_to_the_configured_rate(crm, settings):
    settings.CRM_MAX_REQUESTS_PER_MINUTE = 600  # one each 0.1 s
    settings.CRM_BATCH_SIZE = 5
    make_days(20)
    started = time.monotonic()
    assert crm_sync().requests == 4
    assert time.monotonic() - started >= 0.3


def test_the_fake_crm_answers_429_with_retry_after_beyond_its_rate_limit(fake_crm):
    server = fake_crm(rate_limit=2)
    body = json.dumps({"source": {}, "records": []})
    answers = [requests.post(server.url, data=body, timeout=5) for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 429]
    assert 1 <= int(answers[2].headers["Retry-After"]) <= 60


def test_the_delivery_log_drops_entries_older_than_its_days(crm, settings):
    settings.DELIVERY_LOG_DAYS = 30
    old = DeliveryLog.objects.create(
        created_at=datetime.datetime.now(UTC) - datetime.timedelta(days=31),
        destination="x",
        idempotency_key="k",
        records=1,
        outcome="acknowledged",
        duration_ms=1,
    )
    make_days(1)
    crm_sync()
    assert not DeliveryLog.objects.filter(pk=old.pk).exists()
    assert DeliveryLog.objects.count() == 1


def test_sync_to_crm_prints_what_it_did(crm, capsys):
    make_days(5)
    call_command("sync_to_crm")
    assert "sent 5, failed 0, rejected 0 in 1 batches, 1 requests" in capsys.readouterr().out


def test_sync_to_crm_dry_run_prints_the_request_and_sends_nothing(crm, capsys):
    make_days(5)
    call_command("sync_to_crm", dry_run=True)
    out = capsys.readouterr().out
    assert out.startswith(f"POST {crm.url}")
    assert "Authorization: Token ****" in out and "secret-token" not in out
    body = json.loads(out[out.index("{") :])
    assert len(body["records"]) == 5
    assert crm.state.stats.requests == 0
    assert states() == {"pending": 5}


def test_test_crm_checks_credentials_without_changing_crm_data(crm, settings, capsys):
    call_command("test_crm")
    assert "reachable, credentials accepted" in capsys.readouterr().out
    assert crm.held() == {}
    settings.CRM_API_TOKEN = "wrong"
    with pytest.raises(CommandError, match="refused the credentials"):
        call_command("test_crm")


def test_test_crm_reports_an_unreachable_crm(settings):
    settings.CRM_API_URL = "http://127.0.0.1:9/records"
    assert not crm_check().ok
    with pytest.raises(CommandError, match="unreachable"):
        call_command("test_crm")


def test_test_crm_stats_counts_rows_by_state_and_names_the_oldest_undelivered(crm, capsys):
    ids = make_days(6)
    crm_sync(limit=4)
    call_command("test_crm", stats=True)
    out = capsys.readouterr().out
    assert "rows: pending 2, synced 4, failed 0, rejected 0; in flight 0" in out
    oldest = ProcessedAttendance.objects.get(pk=ids[4])
    assert f"oldest undelivered: {oldest.user_id} on 2026-11-02 (pending since" in out
    assert crm_stats().by_state["synced"] == 4


def test_processed_days_are_delivered_and_a_recomputed_day_goes_again(crm):
    from core.processing import attendance_process
    from core.tests.factories import RawAttendanceFactory

    device = DeviceFactory(name="Front door", timezone="Europe/Lisbon")
    EmployeeFactory(user_id="1001", name="Ana Silva")
    for hour in (8, 17):
        RawAttendanceFactory(
            device=device,
            user_id="1001",
            timestamp=datetime.datetime(2026, 11, 2, hour, 0, tzinfo=UTC),
        )
    attendance_process(full=True)
    assert crm_sync().sent == 1
    assert crm.held()["1001:2026-11-02"]["employee_name"] == "Ana Silva"

    # A late punch: processing writes version 2, due again.
    RawAttendanceFactory(
        device=device, user_id="1001", timestamp=datetime.datetime(2026, 11, 2, 18, 0, tzinfo=UTC)
    )
    attendance_process(full=True)
    assert crm_sync().sent == 1
    record = crm.held()["1001:2026-11-02"]
    assert (record["version"], record["clock_out"]) == (2, "2026-11-02T18:00:00+00:00")


def test_the_fake_crm_command_serves_the_contract_with_its_options():
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    process = subprocess.Popen(
        [
            sys.executable,
            "manage.py",
            "fake_crm",
            "--port",
            "0",
            "--token",
            "T",
            "--reject-user-id",
            "7",
        ],
        cwd=root,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        first = process.stdout.readline()
        assert first.startswith("Fake CRM listening on http://127.0.0.1:")
        url = first.split("listening on", 1)[1].strip()
        assert requests.post(url, json={"records": []}, timeout=5).status_code == 401
        good = {
            "external_id": "1:2026-11-02",
            "version": 1,
            "user_id": "1",
            "work_date": "2026-11-02",
        }
        bad = {**good, "external_id": "7:2026-11-02", "user_id": "7"}
        auth = {"Authorization": "Token T"}
        assert (
            requests.post(url, json={"records": [good, bad]}, headers=auth, timeout=5).status_code
            == 400
        )
        assert (
            requests.post(url, json={"records": [good]}, headers=auth, timeout=5).status_code == 200
        )
        held = requests.get(url, headers=auth, timeout=5).json()
        assert [r["external_id"] for r in held] == ["1:2026-11-02"]
        stats = requests.get(url.replace("/records", "/stats"), headers=auth, timeout=5).json()
        assert (stats["held"], stats["refused"], stats["unauthorized"]) == (1, 1, 1)
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_the_fake_crm_command_rejects_a_bad_fail_rate():
    with pytest.raises(CommandError, match="fail.rate"):
        call_command("fake_crm", "--fail-rate", "2")


def test_test_crm_stats_says_rejected_rows_wait_for_a_change(crm, capsys):
    crm.reject_user_ids = {"1001"}
    make_days(2, users=2)
    crm_sync()
    call_command("test_crm", stats=True)
    out = capsys.readouterr().out
    assert "oldest undelivered: none pending or failed (1 rejected wait for a change" in out


# --- The pull feed -------------------------------------------------------------------------


def follow(cursor=None, *, limit=100, pages=1000):
    """Follows the feed to its end; returns ({external_id: version}, records seen, cursor)."""
    from core.crm import crm_changes

    latest, seen = {}, 0
    for _ in range(pages):
        page = crm_changes(cursor=cursor, limit=limit)
        for record in page.records:
            latest[record["external_id"]] = record["version"]
            seen += 1
        cursor = page.next_cursor
        if not page.has_more:
            break
    return latest, seen, cursor


def test_the_feed_serves_every_row_in_change_order_and_a_changed_row_again():
    from core.crm import crm_changes

    ids = make_days(25)
    first = crm_changes(limit=10)
    assert len(first.records) == 10 and first.has_more
    latest, seen, cursor = follow(first.next_cursor, limit=10)
    assert seen == 15 and len(latest) == 15
    assert crm_changes(cursor=cursor).records == []

    changed = ProcessedAttendance.objects.get(pk=ids[3])
    ProcessedAttendance.objects.filter(pk=changed.pk).update(version=F("version") + 1)
    # Delivery bookkeeping is no change of the day.
    ProcessedAttendance.objects.filter(pk=ids[4]).update(sync_state=State.SYNCED)
    page = crm_changes(cursor=cursor)
    assert [(r["external_id"], r["version"]) for r in page.records] == [
        (f"{changed.user_id}:{changed.work_date}", 2)
    ]
    assert page.records[0]["clock_in"] == "2026-11-02T08:00:00+00:00"


def test_the_feed_serves_days_before_crm_sync_from(settings):
    settings.CRM_SYNC_FROM = datetime.date(2030, 1, 1)
    make_days(3)
    assert follow()[1] == 3


def test_processed_days_enter_the_feed_and_an_hr_edit_moves_one_to_its_end():
    from core.processing import attendance_edit, attendance_process
    from core.tests.factories import RawAttendanceFactory

    device = DeviceFactory()
    for user_id in ("1001", "1002"):
        for hour in (8, 17):
            RawAttendanceFactory(
                device=device,
                user_id=user_id,
                timestamp=datetime.datetime(2026, 11, 2, hour, 0, tzinfo=UTC),
            )
    attendance_process(full=True)
    latest, seen, cursor = follow()
    assert latest == {"1001:2026-11-02": 1, "1002:2026-11-02": 1}
    day = ProcessedAttendance.objects.get(user_id="1001")
    attendance_edit(
        record_id=day.pk,
        clock_in=day.clock_in - datetime.timedelta(hours=1),
        clock_out=day.clock_out,
        user=None,
    )
    assert follow(cursor)[0] == {"1001:2026-11-02": 2}


def test_the_feed_misses_no_change_committed_while_a_consumer_reads():
    from django.db import transaction

    if connection.vendor == "sqlite" and connection.is_in_memory_db():
        pytest.skip("needs PostgreSQL or a SQLite file, not the in-memory test database")
    ids = make_days(120, users=20)
    latest, _, cursor = follow()
    assert len(latest) == 120
    errors = []

    def write(share):
        # Each row changes once: a change the feed skipped would never come back.
        try:
            for pk in share:
                with transaction.atomic():
                    ProcessedAttendance.objects.filter(pk=pk).update(version=F("version") + 1)
                    time.sleep(0.003)  # commit late, while the other writer commits
        except Exception as exc:  # reported below
            errors.append(exc)
        finally:
            connection.close()

    writers = [threading.Thread(target=write, args=(ids[n::2],)) for n in range(2)]
    for writer in writers:
        writer.start()
    deadline = time.monotonic() + 60
    while any(w.is_alive() for w in writers) and time.monotonic() < deadline:
        page_latest, _, cursor = follow(cursor, limit=7)
        latest.update(page_latest)
    for writer in writers:
        writer.join(timeout=10)
    latest.update(follow(cursor)[0])
    assert not errors
    assert set(latest.values()) == {2}, sorted(k for k, v in latest.items() if v != 2)


def test_the_changes_endpoint_needs_the_view_permission_and_a_valid_cursor(
    client, django_user_model
):
    from django.contrib.auth.models import Permission

    make_days(3)
    url = "/api/processed-attendance/changes/"
    user = django_user_model.objects.create_user("feed", is_staff=True)
    client.force_login(user)
    assert client.get(url).status_code == 403
    user.user_permissions.add(Permission.objects.get(codename="view_processedattendance"))
    answer = client.get(url, {"limit": 2}).json()
    assert len(answer["results"]) == 2 and answer["has_more"]
    rest = client.get(url, {"cursor": answer["next_cursor"]}).json()
    assert len(rest["results"]) == 1 and not rest["has_more"]
    bad = client.get(url, {"cursor": "not-a-cursor"})
    assert bad.status_code == 400 and "not a cursor of this feed" in bad.json()["cursor"]
    assert client.get(url, {"limit": 0}).status_code == 400


def test_a_resend_asks_a_crm_that_honours_keys_again(crm):
    ids = make_days(3)
    crm_sync()
    (first,) = crm.keys_seen()
    crm.state.records.clear()  # the CRM lost its data (a restore)
    assert crm_resend(ids=ids) == 3
    assert crm_sync().sent == 3
    assert crm.keys_seen()[1] != first and crm.state.stats.replays == 0
    assert len(crm.held()) == 3


def test_one_claim_takes_several_batches_each_under_its_own_key(crm):
    from core.crm import _claim, _Config, content_key

    if not connection.features.has_select_for_update_skip_locked:
        pytest.skip("SQLite claims one batch at a time")
    ids = make_days(50)
    config = _Config.load(sleep=time.sleep, batch_size=20)
    claimed = _claim(limit=50, config=config, batches=3)
    assert [len(rows) for _key, rows, _records in claimed] == [20, 20, 10]
    assert [row["pk"] for _key, rows, _records in claimed for row in rows] == ids
    for key, rows, records in claimed:
        assert key == content_key(rows)
        assert [r["external_id"] for r in records] == [
            f"{row['user_id']}:{row['work_date'].isoformat()}" for row in rows
        ]
        in_db = ProcessedAttendance.objects.filter(delivery_key=key)
        assert sorted(in_db.values_list("pk", flat=True)) == [row["pk"] for row in rows]
    lease = ProcessedAttendance.objects.get(pk=ids[0]).delivery_lease_until
    assert lease > datetime.datetime.now(UTC) + 2 * config.lease


def test_a_run_stopped_by_an_outage_releases_the_batches_it_claimed_but_did_not_send(crm, settings):
    settings.CRM_MAX_RETRIES = 0
    make_days(60)
    crm.script.extend(["500"])
    result = crm_sync()
    assert (result.sent, result.failed, result.requests) == (0, 20, 1)
    assert states() == {State.PENDING: 40, State.FAILED: 20}
    assert not ProcessedAttendance.objects.exclude(delivery_key="").exists()
    assert crm_sync().sent == 40


def test_claimed_records_are_the_contract_records_of_the_same_rows(crm):
    from core.crm import _RECORD_FIELDS, _claim, _Config, render_records

    tokyo = DeviceFactory(name="Tokyo door", timezone="Asia/Tokyo")
    ids = make_days(6, users=3, device=DeviceFactory(timezone="America/St_Johns"))
    ProcessedAttendance.objects.filter(pk=ids[0]).update(
        clock_in=datetime.datetime(2026, 11, 2, 7, 59, 58, 123456, tzinfo=UTC),
        clock_out=None,
        clock_out_device=None,
        worked=None,
    )
    ProcessedAttendance.objects.filter(pk=ids[1]).update(clock_out_device=tokyo)
    expected = render_records(ProcessedAttendance.objects.order_by("pk").values(*_RECORD_FIELDS))
    claimed = _claim(limit=10, config=_Config.load(sleep=time.sleep, batch_size=None))
    assert [record for _key, _rows, records in claimed for record in records] == expected
    assert expected[0]["clock_in"] == "2026-11-02T04:29:58.123456-03:30"
    assert expected[0]["clock_out"] is None
    assert expected[1]["clock_out"].endswith("+09:00")
