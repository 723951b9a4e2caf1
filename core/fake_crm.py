"""A fake CRM that implements docs/crm-contract.md on a loopback port, for tests,
the demo and the benchmark.

It checks the token and the signature, answers failures at a given rate (500s,
429s with Retry-After, dropped connections), refuses records of one user id,
limits requests per minute, upserts records by external_id keeping the highest
version, and answers a repeated idempotency key with its first answer.
`GET /records` shows what it holds, `GET /stats` counts what happened.

`POST /punches` takes the raw punch contract (device_info and punch records,
docs/crm-contract.md) with the same checks and faults; it keeps each punch
once, keyed by device, employee_id and timestamp, and counts a punch that
arrives again under another idempotency key as a duplicate (`GET /punches`).
"""

import hashlib
import hmac
import json
import logging
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

logger = logging.getLogger(__name__)

# A signature older (or newer) than this is refused: a replayed capture.
SIGNATURE_TOLERANCE_SECONDS = 300
REQUIRED_FIELDS = {
    "external_id": str,
    "version": int,
    "user_id": str,
    "work_date": str,
}
PUNCH_FIELDS = ("employee_id", "employee_name", "timestamp", "date", "time", "punch_type", "device")
DEVICE_INFO_FIELDS = ("name", "serial_number", "ip", "port", "export_time")
MAX_BODY_BYTES = 20_000_000


def _batch(body: bytes) -> tuple[dict, list]:
    """The envelope and its records; ValueError, KeyError or TypeError when it is not one."""
    payload = json.loads(body)
    records = payload["records"]
    if not isinstance(records, list):
        raise TypeError("records is not a list")
    return payload, records


@dataclass
class FakeCrmStats:
    requests: int = 0
    batches_accepted: int = 0
    records_received: int = 0
    records_applied: int = 0
    # A version the CRM already held, or an older one: ignored, as the contract says.
    records_ignored: int = 0
    # A version it already held, arriving under another idempotency key:
    # delivered again (ignored by the contract's rule, but counted).
    records_redelivered: int = 0
    replays: int = 0
    injected_500: int = 0
    injected_429: int = 0
    injected_drop: int = 0
    rate_limited: int = 0
    unauthorized: int = 0
    refused: int = 0
    punch_batches_accepted: int = 0
    punches_received: int = 0
    # The same punch (device, employee_id, timestamp) again under another key.
    punches_duplicated: int = 0


@dataclass
class FakeCrmState:
    """What the fake CRM holds; shared by its request threads under `lock`."""

    records: dict[str, dict] = field(default_factory=dict)
    # (device, employee_id, timestamp) -> the punch record and its device_info.
    punches: dict[tuple[str, str, str], dict] = field(default_factory=dict)
    # The idempotency key each held version arrived under.
    keys: dict[tuple[str, int], str] = field(default_factory=dict)
    answers: dict[str, tuple[int, bytes]] = field(default_factory=dict)
    seen_keys: list[str] = field(default_factory=list)
    stats: FakeCrmStats = field(default_factory=FakeCrmStats)
    request_times: deque = field(default_factory=deque)
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes; with Nagle's algorithm the
    # body would wait for the client's delayed ACK (40 ms a request).
    disable_nagle_algorithm = True

    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        logger.debug("fake CRM: " + format, *args)

    # --- answers ---

    def _send(self, status: int, payload, headers: dict | None = None) -> None:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _drop(self) -> None:
        """Closes the connection without an answer, as a crashing proxy does."""
        self.close_connection = True
        try:
            self.connection.shutdown(2)
        except OSError:
            pass

    def _authorized(self) -> bool:
        crm = self.server.crm
        if crm.token is None:
            return True
        return self.headers.get("Authorization", "") in (
            f"Token {crm.token}",
            f"Bearer {crm.token}",
        )

    # --- GET /records, /stats ---

    def do_GET(self):
        crm = self.server.crm
        if not self._authorized():
            self._send(401, {"detail": "Invalid or missing token."})
            return
        with crm.state.lock:
            if self.path.split("?")[0] == "/records":
                payload = sorted(crm.state.records.values(), key=lambda r: r["external_id"])
            elif self.path.split("?")[0] == "/punches":
                payload = [crm.state.punches[key] for key in sorted(crm.state.punches)]
            elif self.path == "/stats":
                payload = {**vars(crm.state.stats), "held": len(crm.state.records)}
            else:
                payload = None
        if payload is None:
            self._send(404, {"detail": f"No such page: {self.path}"})
        else:
            self._send(200, payload)

    # --- POST /records ---

    def do_POST(self):
        crm = self.server.crm
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            self._send(413, {"detail": "Body too large."})
            return
        body = self.rfile.read(length)
        if crm.latency_ms:
            time.sleep(crm.latency_ms / 1000)
        with crm.state.lock:
            crm.state.stats.requests += 1
        if self.path not in ("/records", "/punches"):
            self._send(404, {"detail": f"No such page: {self.path}"})
            return
        if not self._authorized():
            with crm.state.lock:
                crm.state.stats.unauthorized += 1
            self._send(401, {"detail": "Invalid or missing token."})
            return
        problem = crm.signature_problem(
            body,
            self.headers.get("X-Signature", ""),
            self.headers.get("X-Signature-Timestamp", ""),
        )
        if problem:
            with crm.state.lock:
                crm.state.stats.unauthorized += 1
            self._send(401, {"detail": problem})
            return
        wait = crm.rate_limit_wait()
        if wait:
            self._send(429, {"detail": "Too many requests."}, {"Retry-After": str(wait)})
            return
        fault = crm.draw_fault()
        if fault == "500":
            self._send(500, {"detail": "Injected server error."})
            return
        if fault == "429":
            self._send(
                429, {"detail": "Injected rate limit."}, {"Retry-After": str(crm.retry_after)}
            )
            return
        if fault == "drop-before":
            self._drop()
            return
        if fault == "stall":
            time.sleep(crm.stall_seconds)
            self._drop()
            return
        key = self.headers.get("Idempotency-Key", "")
        apply = crm.apply_punches if self.path == "/punches" else crm.apply
        status, answer = apply(body, key)
        if fault == "drop-after":
            # Applied, but the answer is lost: the bridge must resend under the
            # same key and get the first answer back.
            self._drop()
            return
        self._send(status, answer)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    crm: "FakeCrm"


class FakeCrm:
    """A fake CRM on host:port (port 0: a free one). `start()` serves in a thread."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        signing_secret: str | None = None,
        fail_rate: float = 0.0,
        latency_ms: float = 0.0,
        reject_user_ids: tuple[str, ...] = (),
        rate_limit: int | None = None,
        retry_after: int = 1,
        seed: int | None = None,
        faults: tuple[str, ...] = ("500", "429", "drop-before", "drop-after"),
    ):
        if not 0 <= fail_rate <= 1:
            raise ValueError(f"fail_rate must be between 0 and 1, got {fail_rate}")
        if rate_limit is not None and rate_limit < 1:
            raise ValueError(f"rate_limit must be at least 1 request a minute, got {rate_limit}")
        unknown = set(faults) - {"500", "429", "drop-before", "drop-after"}
        if unknown:
            raise ValueError(f"unknown faults: {', '.join(sorted(unknown))}")
        self.host = host
        self.token = token
        self.signing_secret = signing_secret
        self.fail_rate = fail_rate
        self.latency_ms = latency_ms
        self.reject_user_ids = set(reject_user_ids)
        self.rate_limit = rate_limit
        self.retry_after = retry_after
        self.faults = faults
        self.stall_seconds = 2.0
        # Scripted answers, consumed one per POST before any random fault:
        # "500", "429", "drop-before", "drop-after", "stall" (answer nothing
        # for stall_seconds, then drop), or "ok".
        self.script: deque[str] = deque()
        self.random = random.Random(seed)
        self.state = FakeCrmState()
        self._server = _Server((host, port), _Handler)
        self._server.crm = self
        self.port = self._server.server_address[1]
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/records"

    @property
    def punches_url(self) -> str:
        return f"http://{self.host}:{self.port}/punches"

    def start(self) -> "FakeCrm":
        self._thread = threading.Thread(
            target=self._server.serve_forever, name=f"fake-crm-{self.port}", daemon=True
        )
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._server.serve_forever()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    # --- what the handler asks ---

    def signature_problem(self, body: bytes, signature: str, timestamp: str) -> str:
        if not self.signing_secret:
            return ""
        if not signature or not timestamp:
            return "X-Signature and X-Signature-Timestamp are required."
        try:
            age = abs(time.time() - int(timestamp))
        except ValueError:
            return f"X-Signature-Timestamp is not a Unix time: {timestamp!r}."
        if age > SIGNATURE_TOLERANCE_SECONDS:
            return "X-Signature-Timestamp is too far from now."
        expected = hmac.new(
            self.signing_secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256
        ).hexdigest()
        if not hmac.compare_digest(signature, f"sha256={expected}"):
            return "X-Signature does not match the body."
        return ""

    def rate_limit_wait(self) -> int:
        """Seconds until a request slot frees, 0 when this request may go ahead."""
        if self.rate_limit is None:
            return 0
        now = time.monotonic()
        with self.state.lock:
            times = self.state.request_times
            while times and now - times[0] >= 60:
                times.popleft()
            if len(times) >= self.rate_limit:
                self.state.stats.rate_limited += 1
                return max(1, int(60 - (now - times[0]) + 0.999))
            times.append(now)
            return 0

    def draw_fault(self) -> str:
        with self.state.lock:
            if self.script:
                fault = self.script.popleft()
            elif self.fail_rate and self.random.random() < self.fail_rate:
                fault = self.random.choice(self.faults)
            else:
                return ""
            if fault == "500":
                self.state.stats.injected_500 += 1
            elif fault == "429":
                self.state.stats.injected_429 += 1
            elif fault.startswith("drop") or fault == "stall":
                self.state.stats.injected_drop += 1
            return "" if fault == "ok" else fault

    def _replay(self, key: str) -> tuple[int, dict | bytes] | None:
        """Notes the key; the answer it got before, if this batch was seen (caller holds the lock)."""
        state = self.state
        if not key:
            return None
        state.seen_keys.append(key)
        if key in state.answers:
            state.stats.replays += 1
            return state.answers[key]
        return None

    def _accepted(self, key: str, count: int) -> tuple[int, bytes]:
        answer = (200, json.dumps({"accepted": count}).encode())
        if key:
            self.state.answers[key] = answer
        return answer

    def apply(self, body: bytes, key: str) -> tuple[int, dict | bytes]:
        """Upserts the batch by external_id keeping the highest version, all or nothing."""
        state = self.state
        with state.lock:
            replay = self._replay(key)
            if replay is not None:
                return replay
            try:
                _, records = _batch(body)
            except (ValueError, KeyError, TypeError) as exc:
                state.stats.refused += 1
                return 400, {"detail": f"Not a batch: {exc}"}
            errors = [self._problem(record) for record in records]
            if any(errors):
                state.stats.refused += 1
                listed = [
                    {"external_id": record.get("external_id"), "error": error}
                    for record, error in zip(records, errors, strict=True)
                    if error
                ]
                status = 400 if len(records) > 1 else 422
                return status, {"detail": "Records refused; nothing was stored.", "errors": listed}
            state.stats.records_received += len(records)
            for record in records:
                held = state.records.get(record["external_id"])
                if held is not None and held["version"] >= record["version"]:
                    state.stats.records_ignored += 1
                    if held["version"] == record["version"] and state.keys.get(
                        (record["external_id"], record["version"])
                    ) not in (None, key):
                        state.stats.records_redelivered += 1
                    continue
                state.records[record["external_id"]] = record
                state.keys[(record["external_id"], record["version"])] = key
                state.stats.records_applied += 1
            state.stats.batches_accepted += 1
            return self._accepted(key, len(records))

    def apply_punches(self, body: bytes, key: str) -> tuple[int, dict | bytes]:
        """Stores a batch of punches of one device, each once, all or nothing."""
        state = self.state
        with state.lock:
            replay = self._replay(key)
            if replay is not None:
                return replay
            try:
                payload, records = _batch(body)
                info = payload.get("device_info")
                if records and not (
                    isinstance(info, dict) and all(name in info for name in DEVICE_INFO_FIELDS)
                ):
                    raise TypeError(f"device_info needs {', '.join(DEVICE_INFO_FIELDS)}")
            except (ValueError, KeyError, TypeError) as exc:
                state.stats.refused += 1
                return 400, {"detail": f"Not a punch batch: {exc}"}
            errors = [self._punch_problem(record, info) for record in records]
            if any(errors):
                state.stats.refused += 1
                listed = [
                    {"punch": record, "error": error}
                    for record, error in zip(records, errors, strict=True)
                    if error
                ]
                status = 400 if len(records) > 1 else 422
                return status, {"detail": "Punches refused; nothing was stored.", "errors": listed}
            for record in records:
                state.stats.punches_received += 1
                punch = (record["device"], record["employee_id"], record["timestamp"])
                if punch in state.punches:
                    state.stats.punches_duplicated += 1
                    continue
                state.punches[punch] = {**record, "device_info": info}
            state.stats.punch_batches_accepted += 1
            return self._accepted(key, len(records))

    def _punch_problem(self, record, info: dict) -> str:
        if not isinstance(record, dict):
            return "a punch is a JSON object"
        for name in PUNCH_FIELDS:
            if not isinstance(record.get(name), str):
                return f"{name} is missing or not a string"
        if record["device"] != info["name"]:
            return "a request carries the punches of the device its device_info names"
        if record["employee_id"] in self.reject_user_ids:
            return f"user {record['employee_id']} is not known to this CRM"
        return ""

    def _problem(self, record) -> str:
        if not isinstance(record, dict):
            return "a record is a JSON object"
        for name, kind in REQUIRED_FIELDS.items():
            if not isinstance(record.get(name), kind):
                return f"{name} is missing or not a {kind.__name__}"
        if record["user_id"] in self.reject_user_ids:
            return f"user {record['user_id']} is not known to this CRM"
        return ""

    # --- what tests read ---

    def held(self) -> dict[str, dict]:
        with self.state.lock:
            return dict(self.state.records)

    def punches(self) -> dict[tuple[str, str, str], dict]:
        with self.state.lock:
            return dict(self.state.punches)

    def keys_seen(self) -> list[str]:
        with self.state.lock:
            return list(self.state.seen_keys)
