"""Push mode: the emulated clock as a ZKTeco PUSH client ("ADMS", "Cloud server").

A `PushClock` takes the same `DeviceState` the binary server serves and pushes
it to a receiver's /iclock/ endpoints the way firmware does
(shared/ADMS_PROTOCOL.md; section numbers below refer to it):

- handshake (GET cdata?options=all), reading the stamps, Delay, ErrorDelay,
  TransInterval, Realtime, TransFlag and TimeZone from the reply; a line counts
  only when a newline follows it; UNKNOWN DEVICE or RETRY fails it (§3.3);
- the log uploaded from the ATTLOG stamp in batches whose size adapts as
  firmware's does (+10 after a success up to 150, -30 after a failure while
  above 30); `Stamp` is the ZK time of the batch's last record; a batch is
  never cut inside one second, so the stamp cursor loses nothing (§4.2, §7.4);
- with Realtime=1 each new punch goes at once, otherwise every TransInterval
  minutes;
- anything but 200 with OK in the body keeps the batch: three tries 0.3, 0.6,
  0.9 s apart, then offline for ErrorDelay (§4.2);
- getrequest every Delay seconds (INFO on the first and after changes), about
  1 s after commands, the interval climbing back by Delay/5; commands carried
  out on the state and their results posted (INFO alone) before the next poll,
  again when the reply was not 200 text/plain (§5, §6);
- the clock set from the Date header plus TimeZone when more than 10 s off (§7.2).

Faults: `drop_rate` closes the connection after an upload is sent, before the
answer is read (the receiver may have stored it; the clock sends it again);
`down` windows (seconds after start) in which the clock reaches nobody.

Stdlib only, one thread per clock plus one for live punches.
"""

import bisect
import email.utils
import http.client
import logging
import random
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from urllib.parse import quote, urlencode, urlsplit

from core.zk.emulator.generate import next_punch_of
from core.zk.emulator.state import AttendanceRecord, DeviceState, UserRecord
from core.zk.protocol import encode_time

logger = logging.getLogger(__name__)

USER_AGENT = "iClock Proxy/1.09"
PUSH_VERSION = "2.4.1"
# Batch sizes as firmware adapts them (§4.2); where it starts is not documented.
BATCH_START = 100
BATCH_MAX = 150
BATCH_STEP_UP = 10
BATCH_STEP_DOWN = 30
BATCH_MIN = 30
RETRY_SLEEPS = (0.3, 0.6, 0.9)
# Polls after commands come this soon (§5).
AFTER_COMMANDS = 1.0
# The clock resets its time when the server's differs by more than this (§7.2).
TIME_SYNC_THRESHOLD = 10.0
TIME_SYNC_MAX_ROUND_TRIP = 5.0
USERS_PER_UPLOAD = 100
_TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
# Return codes (§6.3).
RETURN_OK = 0
RETURN_BAD_PARAMETER = -1
RETURN_NO_SUCH_PIN = -10
RETURN_NOT_SUPPORTED = -1002


class PushFailed(Exception):
    """A request that did not end in 200 with OK (or did not end at all)."""


@dataclass
class Reply:
    status: int
    body: bytes
    content_type: str
    date: str | None
    seconds: float

    @property
    def ok(self) -> bool:
        return self.status == 200 and b"OK" in self.body


@dataclass
class PushStats:
    """What the clock did, for tests and the benchmark. Lists grow with every
    request: fine for runs of minutes."""

    requests: int = 0
    failures: int = 0
    dropped: int = 0
    # Records acknowledged by the receiver (each once, however often sent).
    punches_acknowledged: int = 0
    punches_sent: int = 0
    handshakes: int = 0
    polls: int = 0
    commands: list[tuple[str, str, int]] = field(default_factory=list)
    # (kind, seconds) per request that got an answer.
    latencies: list[tuple[str, float]] = field(default_factory=list)
    reboots: int = 0


def _lines_with_newline(text: str) -> list[str]:
    """Lines as the firmware reads them: split on CR or LF, and a last line
    with no newline after it does not count (§3.3)."""
    parts = text.replace("\r", "\n").split("\n")
    return [line for line in parts[:-1] if line]


def timezone_offset(value: str) -> timedelta | None:
    """The TimeZone option: hours when |v| < 25, otherwise minutes (§7.2)."""
    value = value.strip()
    if not value.lstrip("-+").isdigit():
        return None
    number = int(value)
    return timedelta(hours=number) if abs(number) < 25 else timedelta(minutes=number)


def parse_down_windows(text: str) -> list[tuple[float, float]]:
    """`START:END[,START:END...]` seconds after start; ValueError saying what is wrong."""
    windows = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        start, sep, end = part.partition(":")
        try:
            window = (float(start), float(end))
        except ValueError:
            raise ValueError(f"{part!r} is not START:END in seconds") from None
        if not sep or window[0] < 0 or window[1] <= window[0]:
            raise ValueError(f"{part!r}: END must come after START, both 0 or more")
        windows.append(window)
    return windows


class PushClock:
    """Pushes a DeviceState to a receiver's /iclock/ until stop().

    `url` is the server's root (http://host:port). `serial` overrides the
    state's serial number. `live_interval` seconds: someone punches that often
    while the clock runs. `clock_offset` seconds is added to this computer's
    clock to make the device clock, until the server sets it. `seed` makes the
    drops and live punches repeatable.
    """

    def __init__(
        self,
        state: DeviceState,
        url: str,
        *,
        serial: str | None = None,
        live_interval: float | None = None,
        clock_offset: float = 0.0,
        drop_rate: float = 0.0,
        down: list[tuple[float, float]] | None = None,
        timeout: float = 10.0,
        seed: int | None = None,
        ip_address: str = "127.0.0.1",
        error_delay: float = 30.0,
    ):
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"url: expected http://host[:port], got {url!r}")
        if not 0.0 <= drop_rate <= 1.0:
            raise ValueError("drop_rate: expected a number from 0 to 1")
        if live_interval is not None and live_interval <= 0:
            raise ValueError("live_interval: must be a positive number of seconds")
        self.state = state
        self.host = parts.hostname
        self.port = parts.port or 80
        self.prefix = parts.path.rstrip("/")
        self.serial = serial or state.serial_number
        self.live_interval = live_interval
        self.clock_offset = float(clock_offset)
        self.drop_rate = drop_rate
        self.down = list(down or [])
        self.timeout = timeout
        self.ip_address = ip_address
        self.stats = PushStats()
        self._rng = random.Random(seed)
        # What the server said at the handshake (its defaults until then).
        self.options: dict[str, str] = {}
        self.delay = 10.0
        self.error_delay = float(error_delay)
        self.trans_interval = 1.0
        self.realtime = True
        self.trans_flag = ""
        self.timezone: timedelta | None = None
        self.attlog_stamp = 0
        self.operlog_stamp = 0
        self.batch_size = BATCH_START
        self.connected = False
        self._need_handshake = True
        self._need_info = True
        # Bodies to post to devicecmd, oldest first; results of this round.
        self._pending_results: list[str] = []
        self._round_results: list[str] = []
        self._next_poll = 0.0
        self._poll_interval = 0.0
        self._next_upload = 0.0
        self._offline_until = 0.0
        self._sorted: list[AttendanceRecord] = []
        self._stamps: list[int] = []
        self._sorted_last: AttendanceRecord | None = None
        self._seen = 0
        self._acked_stamp = -1
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._no_more_punches = threading.Event()
        self._threads: list[threading.Thread] = []
        self._started_at = 0.0

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> "PushClock":
        self._started_at = time.monotonic()
        self._spawn(self._run, f"push-{self.serial}")
        if self.live_interval:
            self._spawn(self._live_loop, f"push-live-{self.serial}")
        return self

    def stop_punching(self) -> None:
        """Nobody punches from now on; the clock keeps uploading what it has."""
        self._no_more_punches.set()

    def stop(self) -> None:
        self._no_more_punches.set()
        self._stopping.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(self.timeout + 5)
        self._threads = []

    def __enter__(self) -> "PushClock":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def caught_up(self) -> bool:
        """Every record in the log acknowledged by the server."""
        with self.state.lock:
            newest = max((r.timestamp for r in self.state.attendance), default=None)
        return self.connected and (newest is None or encode_time(newest) <= self.attlog_stamp)

    def run_forever(self) -> None:
        """Blocks until stop() or KeyboardInterrupt."""
        while not self._stopping.wait(0.5):
            pass

    def _spawn(self, target, name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    # -- the device clock ------------------------------------------------------------

    def device_now(self) -> datetime:
        return (datetime.now() + timedelta(seconds=self.clock_offset)).replace(microsecond=0)

    def punch(
        self, user_id: str, timestamp: datetime | None = None, *, status: int = 1, punch: int = 0
    ) -> AttendanceRecord:
        """Someone punches now; with Realtime=1 the clock uploads it at once."""
        record = self.state.add_punch(
            user_id=user_id, timestamp=timestamp or self.device_now(), status=status, punch=punch
        )
        self._need_info = True
        self._wake.set()
        return record

    def _live_loop(self) -> None:
        rng = random.Random(self._rng.random())
        while not self._no_more_punches.wait(self.live_interval):
            with self.state.lock:
                users = list(self.state.users)
            if users:
                user = rng.choice(users)
                status, punch = next_punch_of(self.state, user.user_id, self.device_now().date())
                self.punch(user.user_id, status=status, punch=punch)

    def _set_clock(self, reply: Reply) -> None:
        # §7.2: only from a text/plain reply with a Date, with TimeZone added,
        # and only when the exchange was quick enough to trust.
        if self.timezone is None or not reply.date or "text/plain" not in reply.content_type:
            return
        if reply.seconds >= TIME_SYNC_MAX_ROUND_TRIP:
            return
        try:
            server = email.utils.parsedate_to_datetime(reply.date)
        except (TypeError, ValueError):
            return
        local = server.replace(tzinfo=None) + self.timezone
        if abs((local - self.device_now()).total_seconds()) > TIME_SYNC_THRESHOLD:
            self.clock_offset = (local - datetime.now()).total_seconds()
            logger.info("%s: clock set to %s", self.serial, local)

    # -- the main loop ---------------------------------------------------------------

    def _is_down(self) -> bool:
        elapsed = time.monotonic() - self._started_at
        return any(start <= elapsed < end for start, end in self.down)

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self.step()
            except Exception:
                # One clock's bug must not end a benchmark of many: log, back off.
                logger.exception("%s: push loop failed", self.serial)
                self._offline(self.error_delay)
            self._wake.wait(self._sleep_for())
            self._wake.clear()

    def _sleep_for(self) -> float:
        now = time.monotonic()
        if now < self._offline_until:
            return self._offline_until - now
        elapsed = now - self._started_at
        for start, end in self.down:
            if start <= elapsed < end:
                return end - elapsed
        if self._has_new_records() and (self.realtime or now >= self._next_upload):
            return 0.0
        moments = [self._next_poll]
        if not self.realtime and self.trans_interval:
            moments.append(self._next_upload)
        return max(0.01, min(moments) - now)

    def _offline(self, seconds: float) -> None:
        self._offline_until = time.monotonic() + seconds

    def step(self) -> None:
        """One round: handshake if needed, uploads that are due, a poll if due."""
        if self._stopping.is_set() or time.monotonic() < self._offline_until or self._is_down():
            return
        if self._need_handshake:
            if not self.handshake():
                self._offline(self.error_delay)
                return
            if not self.upload_users() or not self.upload_log():
                self._offline(self.error_delay)
                return
            self._next_upload = time.monotonic() + self.trans_interval * 60
        now = time.monotonic()
        if self._has_new_records() and (self.realtime or now >= self._next_upload):
            if not self.upload_log():
                self._offline(self.error_delay)
                return
            self._next_upload = time.monotonic() + self.trans_interval * 60
        if time.monotonic() >= self._next_poll:
            self.poll()

    # -- HTTP ------------------------------------------------------------------------

    def _path(self, endpoint: str, **params) -> str:
        query = urlencode({"SN": self.serial, **params}, quote_via=quote)
        return f"{self.prefix}/iclock/{endpoint}?{query}"

    def request(self, kind: str, method: str, path: str, body: bytes | None = None) -> Reply:
        """One exchange on a new connection, as firmware does. Raises PushFailed
        when the connection fails or, for a dropped upload, is cut on purpose."""
        self.stats.requests += 1
        headers = {"User-Agent": USER_AGENT, "Accept": "*/*", "Connection": "close"}
        if body is not None:
            headers["Content-Type"] = "text/plain"
            if self.drop_rate and self._rng.random() < self.drop_rate:
                self._send_and_hang_up(path, body, headers)
                self.stats.dropped += 1
                raise PushFailed("connection lost before the answer (fault)")
        started = time.monotonic()
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            content = response.read()
        except (OSError, http.client.HTTPException) as exc:
            self.stats.failures += 1
            raise PushFailed(f"{type(exc).__name__}: {exc}") from exc
        finally:
            conn.close()
        seconds = time.monotonic() - started
        self.stats.latencies.append((kind, seconds))
        return Reply(
            status=response.status,
            body=content,
            content_type=response.getheader("Content-Type") or "",
            date=response.getheader("Date"),
            seconds=seconds,
        )

    def _send_and_hang_up(self, path: str, body: bytes, headers: dict) -> None:
        head = f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
        head += "".join(f"{key}: {value}\r\n" for key, value in headers.items())
        head += f"Content-Length: {len(body)}\r\n\r\n"
        try:
            with socket.create_connection((self.host, self.port), timeout=self.timeout) as sock:
                sock.sendall(head.encode() + body)
        except OSError:
            pass

    # -- handshake -------------------------------------------------------------------

    def handshake(self) -> bool:
        """GET cdata?options=all; True when the server accepted the clock."""
        self.stats.handshakes += 1
        path = self._path("cdata", options="all", pushver=PUSH_VERSION, language="69")
        try:
            reply = self.request("handshake", "GET", path)
        except PushFailed as exc:
            logger.info("%s: handshake failed: %s", self.serial, exc)
            return False
        lines = _lines_with_newline(reply.body.decode("utf-8", errors="replace"))
        if reply.status != 200 or any(line.startswith(("UN", "RETRY")) for line in lines):
            logger.info("%s: handshake refused (%s)", self.serial, reply.status)
            self.connected = False
            return False
        options = dict(line.split("=", 1) for line in lines if "=" in line)
        self.options = options
        self.attlog_stamp = _stamp(options, "ATTLOGStamp", "Stamp")
        self.operlog_stamp = _stamp(options, "OPERLOGStamp", "OpStamp")
        self.delay = _number(options.get("Delay"), self.delay, 1, 3600)
        self.error_delay = _number(options.get("ErrorDelay"), self.error_delay, 1, 3600)
        self.trans_interval = _number(options.get("TransInterval"), self.trans_interval, 0, 1440)
        self.realtime = options.get("Realtime", "1").strip() != "0"
        self.trans_flag = options.get("TransFlag", "")
        zone = timezone_offset(options.get("TimeZone", ""))
        if zone is not None:
            self.timezone = zone
        self._set_clock(reply)
        self._need_handshake = False
        self._need_info = True
        self.connected = True
        self._next_poll = 0.0
        self._poll_interval = self.delay
        return True

    # -- uploads ---------------------------------------------------------------------

    def _refresh_log(self) -> None:
        # The log sorted by time with its ZK stamps, kept up to date as punches
        # are added (in time order, normally; otherwise sorted again).
        with self.state.lock:
            log = self.state.attendance
            if len(log) < self._seen or (
                self._seen and self._sorted and log[self._seen - 1] is not self._sorted_last
            ):
                self._seen = 0
                self._sorted, self._stamps = [], []
            new = log[self._seen :]
            self._seen = len(log)
            self._sorted_last = log[-1] if log else None
        if not new:
            return
        new_stamps = [encode_time(r.timestamp) for r in new]
        if self._stamps and min(new_stamps) < self._stamps[-1] or sorted(new_stamps) != new_stamps:
            pairs = sorted(
                zip(self._stamps + new_stamps, self._sorted + new, strict=True), key=_first
            )
            self._stamps = [s for s, _ in pairs]
            self._sorted = [r for _, r in pairs]
        else:
            self._stamps += new_stamps
            self._sorted += new

    def _has_new_records(self) -> bool:
        if self._need_handshake:
            return False
        self._refresh_log()
        return bool(self._stamps) and self._stamps[-1] > self.attlog_stamp

    def upload_log(self) -> bool:
        """Uploads every record after the ATTLOG stamp, batch after batch; True
        when all went through, False when a batch failed three times (kept)."""
        self._refresh_log()
        while not self._stopping.is_set() and not self._is_down():
            begin = bisect.bisect_right(self._stamps, self.attlog_stamp)
            if begin >= len(self._stamps):
                return True
            end = min(begin + self.batch_size, len(self._stamps))
            # Never cut inside one second: the next batch starts after the stamp.
            last = self._stamps[end - 1]
            end = bisect.bisect_right(self._stamps, last, lo=end - 1)
            batch = self._sorted[begin:end]
            body = b"".join(_attlog_line(r) for r in batch)
            path = self._path("cdata", table="ATTLOG", Stamp=str(last))
            if not self._upload(path, body, "upload"):
                self.batch_size = max(BATCH_MIN, self.batch_size - BATCH_STEP_DOWN)
                return False
            self.batch_size = min(BATCH_MAX, self.batch_size + BATCH_STEP_UP)
            self.attlog_stamp = last
            self.stats.punches_sent += len(batch)
            # Counted once per record, however often it went (a stamp reset
            # to 0 sends everything again): past the highest stamp so far.
            if last > self._acked_stamp:
                done = bisect.bisect_right(self._stamps, self._acked_stamp)
                self.stats.punches_acknowledged += end - max(begin, done)
                self._acked_stamp = last
        return False

    def upload_users(self) -> bool:
        """With EnrollUser in TransFlag and no OPERLOG stamp yet, the users as
        OPERLOG USER lines (names, cards, privileges), as a new clock sends them."""
        if "EnrollUser" not in self.trans_flag or self.operlog_stamp:
            return True
        with self.state.lock:
            users = list(self.state.users)
        stamp = str(encode_time(self.device_now()))
        for start in range(0, len(users), USERS_PER_UPLOAD):
            body = b"".join(_user_line(u) for u in users[start : start + USERS_PER_UPLOAD])
            if not self._upload(self._path("cdata", table="OPERLOG", Stamp=stamp), body, "users"):
                return False
        self.operlog_stamp = int(stamp)
        return True

    def _upload(self, path: str, body: bytes, kind: str) -> bool:
        """POST with firmware's retries (§4.2); True on 200 with OK."""
        for attempt, pause in enumerate((*RETRY_SLEEPS, None)):
            if self._stopping.is_set() or self._is_down():
                return False
            try:
                reply = self.request(kind, "POST", path, body)
            except PushFailed as exc:
                logger.info("%s: upload attempt %d failed: %s", self.serial, attempt + 1, exc)
            else:
                if reply.ok:
                    return True
                self.stats.failures += 1
                logger.info("%s: upload refused: %s %r", self.serial, reply.status, reply.body[:80])
                if reply.body.startswith(b"UNKNOWN DEVICE") or reply.status == 403:
                    # Not (or no longer) approved: shake hands again later.
                    self._need_handshake = True
                    return False
            if pause is not None:
                self._stopping.wait(pause)
        return False

    # -- commands --------------------------------------------------------------------

    def poll(self) -> None:
        """GET getrequest (with INFO when due), then carry out and answer the commands."""
        self._post_results()
        self.stats.polls += 1
        params = {"INFO": self.info()} if self._need_info else {}
        try:
            reply = self.request("poll", "GET", self._path("getrequest", **params))
        except PushFailed:
            self._next_poll = time.monotonic() + self.error_delay
            return
        self._set_clock(reply)
        text = reply.body.decode("utf-8", errors="replace")
        if reply.status != 200 or text.startswith(("UNKNOWN DEVICE", "RETRY")):
            self._need_handshake = reply.status in (200, 403)
            self._next_poll = time.monotonic() + self.error_delay
            return
        self._need_info = False
        commands = [line for line in _lines_with_newline(text) if line.startswith("C:")]
        if not commands:
            # Idle: the interval climbs back to Delay by Delay/5 steps (§5).
            self._poll_interval = min(self.delay, self._poll_interval + self.delay / 5)
            self._next_poll = time.monotonic() + self._poll_interval
            return
        reboot = False
        for line in commands:
            _c, command_id, command = line.split(":", 2)
            reboot |= self.run_command(command_id, command)
        if self._round_results:
            self._pending_results.append("\n".join(self._round_results))
            self._round_results = []
        self._post_results()
        self._poll_interval = 0.0
        self._next_poll = time.monotonic() + AFTER_COMMANDS
        if reboot:
            self.stats.reboots += 1
            self._need_handshake = True
            self._offline(min(self.error_delay, 2.0))

    def info(self) -> str:
        """getrequest's INFO: firmware, users, fingerprints, records, IP, fpAlg,
        faceAlg, faces needed, faces, flags (§5)."""
        with self.state.lock:
            counts = len(self.state.users), len(self.state.templates), len(self.state.attendance)
        return (
            f"{self.state.firmware},{counts[0]},{counts[1]},{counts[2]},"
            f"{self.ip_address},10,7,0,0,100"
        )

    def run_command(self, command_id: str, command: str) -> bool:
        """Carries out one command on the state and keeps its result to post;
        True for a reboot."""
        verb, _, rest = command.partition(" ")
        verb = verb.upper()
        code, extra = RETURN_NOT_SUPPORTED, ""
        reboot = False
        if verb == "INFO":
            code, extra = RETURN_OK, self._options_text()
        elif verb == "CHECK":
            code = RETURN_OK
            self._need_handshake = True
        elif verb == "REBOOT":
            code, reboot = RETURN_OK, True
        elif verb == "DATA":
            code = self._data_command(rest)
        self.stats.commands.append((command_id, command, code))
        result = f"ID={command_id}&Return={code}&CMD={verb}"
        if verb == "INFO":
            # The firmware posts an INFO result alone, its options on the lines after it.
            self._pending_results.append(f"{result}\n{extra}")
        else:
            self._round_results.append(result)
        return reboot

    def _options_text(self) -> str:
        with self.state.lock:
            users, fps, records = (
                len(self.state.users),
                len(self.state.templates),
                len(self.state.attendance),
            )
        return "\n".join(
            [
                f"~DeviceName={self.state.device_name}",
                f"FWVersion={self.state.firmware}",
                f"~Platform={self.state.platform}",
                f"UserCount={users}",
                f"FPCount={fps}",
                f"TransactionCount={records}",
                f"IPAddress={self.ip_address}",
                f"MAC={self.state.mac}",
                f"MainTime={self.device_now():{_TIME_FORMAT}}",
            ]
        )

    def _data_command(self, rest: str) -> int:
        action, _, rest = rest.partition(" ")
        table, _, fields_text = rest.partition(" ")
        action, table = action.upper(), table.upper()
        fields = {}
        for part in fields_text.split("\t"):
            key, sep, value = part.partition("=")
            if sep:
                fields[key.strip()] = value.strip()
        if action == "QUERY" and table == "ATTLOG":
            return self._query_attlog(fields)
        if table != "USERINFO":
            return RETURN_NOT_SUPPORTED
        pin = fields.get("PIN", "")
        if not pin or len(pin.encode()) > 24:
            return RETURN_BAD_PARAMETER
        if action == "UPDATE":
            return self._update_user(pin, fields)
        if action == "DELETE":
            user = self.state.user_by_user_id(pin)
            if user is None:
                return RETURN_NO_SUCH_PIN
            self.state.delete_user(user.uid)
            self._need_info = True
            return RETURN_OK
        return RETURN_NOT_SUPPORTED

    def _update_user(self, pin: str, fields: dict[str, str]) -> int:
        card = fields.get("Card", "")
        try:
            privilege = int(fields.get("Pri") or 0)
            card_number = int(card) if card.isdigit() else 0
        except ValueError:
            return RETURN_BAD_PARAMETER
        with self.state.lock:
            existing = self.state.user_by_user_id(pin)
            uid = (
                existing.uid if existing else max((u.uid for u in self.state.users), default=0) + 1
            )
            if uid > 65535:
                return -1001
            self.state.upsert_user(
                UserRecord(
                    uid=uid,
                    user_id=pin,
                    name=fields.get("Name", existing.name if existing else "")[:24],
                    privilege=max(0, min(255, privilege)),
                    password=fields.get("Passwd", "")[:8],
                    card=card_number if card_number < 2**32 else 0,
                    group_id=fields.get("Grp", ""),
                )
            )
        self._need_info = True
        return RETURN_OK

    def _query_attlog(self, fields: dict[str, str]) -> int:
        """DATA QUERY ATTLOG: the records in the range go up through cdata, without
        moving the stamp; -1 when there are none (as a ZAM180 answers)."""
        try:
            start = datetime.strptime(fields.get("StartTime", ""), _TIME_FORMAT)
            end = datetime.strptime(fields.get("EndTime", ""), _TIME_FORMAT)
        except ValueError:
            return RETURN_BAD_PARAMETER
        with self.state.lock:
            records = sorted(
                (r for r in self.state.attendance if start <= r.timestamp <= end),
                key=lambda r: r.timestamp,
            )
        if not records:
            return RETURN_BAD_PARAMETER
        for begin in range(0, len(records), BATCH_MAX):
            body = b"".join(_attlog_line(r) for r in records[begin : begin + BATCH_MAX])
            if not self._upload(self._path("cdata", table="ATTLOG"), body, "query"):
                return -1003
        return RETURN_OK

    def _post_results(self) -> None:
        """Posts the results waiting, each body once answered 200 text/plain;
        otherwise it stays for the next round (§6.3)."""
        while self._pending_results and not self._stopping.is_set():
            body = self._pending_results[0].encode() + b"\n"
            try:
                reply = self.request("result", "POST", self._path("devicecmd"), body)
            except PushFailed:
                return
            if reply.status != 200 or "text/plain" not in reply.content_type:
                return
            self._pending_results.pop(0)


def _first(pair):
    return pair[0]


def _stamp(options: dict[str, str], *keys: str) -> int:
    for key in keys:
        value = options.get(key, "").strip()
        if value.isdigit():
            return int(value)
    # None, empty or missing: everything (§7.4).
    return 0


def _number(value: str | None, default: float, low: float, high: float) -> float:
    try:
        number = float(value) if value is not None else default
    except ValueError:
        return default
    return min(high, max(low, number))


def _attlog_line(record: AttendanceRecord) -> bytes:
    # PIN, time, state (check-in/out...), verify method, work code, reserved x2.
    return (
        f"{record.user_id}\t{record.timestamp:{_TIME_FORMAT}}\t{record.punch}\t"
        f"{record.status}\t0\t0\t0\n"
    ).encode()


def _user_line(user: UserRecord) -> bytes:
    return (
        f"USER PIN={user.user_id}\tName={user.name}\tPri={user.privilege}\t"
        f"Passwd={user.password}\tCard={user.card or ''}\tGrp=1\tTZ=0000000000000000\t"
        "Verify=0\tViceCard=\n"
    ).encode()
