"""A fake ZKTeco time clock that speaks the binary protocol of port 4370.

The emulator listens on TCP and UDP on the same loopback port and answers every
request pyzk (0.9 and git HEAD) sends, in the formats a real clock uses for each
transport: 72-byte users and 40-byte attendance records over TCP, 28-byte users
and 16-byte records over UDP. Its data lives in a `DeviceState` that can be
generated, loaded from and saved to JSON, and changed while it runs.

Protocol facts and their sources are in shared/ZK_PROTOCOL.md; the section numbers
in the comments below refer to it. docs/emulator.md says how to run it.

Pure Python (stdlib only, no Django): a thread per TCP connection, a thread per
UDP peer, one thread accepting, one reading UDP, one making live punches.
"""

import array
import codecs
import json
import logging
import queue
import random
import selectors
import socket
import struct
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from datetime import time as dtime
from pathlib import Path

from core.zk.protocol import USER_28, USER_72, decode_time, encode_time

logger = logging.getLogger(__name__)

# --- Protocol constants (pyzk zk/const.py) -------------------------------------------

CMD_DB_RRQ = 7
CMD_USER_WRQ = 8
CMD_USERTEMP_RRQ = 9
CMD_OPTIONS_RRQ = 11
CMD_OPTIONS_WRQ = 12
CMD_ATTLOG_RRQ = 13
CMD_CLEAR_DATA = 14
CMD_CLEAR_ATTLOG = 15
CMD_DELETE_USER = 18
CMD_DELETE_USERTEMP = 19
CMD_UNLOCK = 31
CMD_GET_FREE_SIZES = 50
CMD_ENABLE_CLOCK = 57
CMD_STARTVERIFY = 60
CMD_CANCELCAPTURE = 62
CMD_WRITE_LCD = 66
CMD_CLEAR_LCD = 67
CMD_GET_PINWIDTH = 69
CMD_DOORSTATE_RRQ = 75
CMD_GET_USERTEMP = 88
CMD_SAVE_USERTEMPS = 110
CMD_DEL_USER_TEMP = 134
CMD_GET_TIME = 201
CMD_SET_TIME = 202
CMD_REG_EVENT = 500
CMD_CONNECT = 1000
CMD_EXIT = 1001
CMD_ENABLEDEVICE = 1002
CMD_DISABLEDEVICE = 1003
CMD_RESTART = 1004
CMD_POWEROFF = 1005
CMD_REFRESHDATA = 1013
CMD_REFRESHOPTION = 1014
CMD_TESTVOICE = 1017
CMD_GET_VERSION = 1100
CMD_AUTH = 1102
CMD_PREPARE_DATA = 1500
CMD_DATA = 1501
CMD_FREE_DATA = 1502
CMD_PREPARE_BUFFER = 1503
CMD_READ_BUFFER = 1504
CMD_ACK_OK = 2000
CMD_ACK_ERROR = 2001
CMD_ACK_UNAUTH = 2005
CMD_ACK_UNKNOWN = 0xFFFF

EF_ATTLOG = 1
FCT_ATTLOG = 1
FCT_FINGERTMP = 2
FCT_USER = 5

_COMMAND_NAMES = {value: name for name, value in list(globals().items()) if name.startswith("CMD_")}

TCP_MAGIC = b"\x50\x50\x82\x7d"
HEADER = struct.Struct("<4H")

# --- Device limits and behaviour ------------------------------------------------------

# Capacities a real TFT clock reports (pyzk test.py capture); raised to the
# current count when the data outgrows them, so "free" never goes negative.
USER_CAPACITY = 10_000
FINGER_CAPACITY = 3_000
RECORD_CAPACITY = 100_000
PIN_WIDTH = 9

# Form B over TCP sends each 1504 chunk as PREPARE_DATA, ONE DATA frame holding the
# whole chunk (<= 65472 bytes, under the npm clients' u16 length), then ACK_OK.
# One DATA frame per chunk is what keeps pyzk reliable whatever the kernel
# coalesces: its reader recv()s once per DATA frame, so a real clock's run of
# 1008-byte frames that arrive together makes it block until its timeout (§3.3).
# The 10 ms gap after every frame is for node-zklib, which handles at most one
# frame per socket read (§3.3); pyzk does not need it. On a loaded 2-core box it
# costs about 2 s per 100 000 records, which is still faster than a real clock.
CHUNK_FRAME_GAP = 0.010
# Over UDP every datagram must fit pyzk's recv(1024 + 8).
UDP_DATA_PIECE = 1024
# A real clock announces 1008-byte pieces in its PREPARE_DATA; clients ignore it.
PREPARE_PIECE_SIZE = 1008

# An event is pushed only after the client acknowledged the previous one (or
# this long passed): two events in one TCP read make pyzk mis-parse (§2.3).
EVENT_ACK_WAIT = 2.0
MAX_QUEUED_EVENTS = 1000

POLL_INTERVAL = 0.05
# A peer that stops reading mid-transfer gets its connection closed after this.
SEND_TIMEOUT = 60.0
MAX_TCP_CLIENTS = 64
MAX_UDP_PEERS = 64
UDP_PEER_IDLE = 600.0
UDP_QUEUE_DEPTH = 64
# Clients send at most ~1 KiB per packet; anything claiming more is garbage.
MAX_INBOUND_PACKET = 64 * 1024
MAX_UPLOAD = 16 * 1024 * 1024
JOIN_TIMEOUT = 5.0


# --- Wire helpers -------------------------------------------------------------------


def _ones_sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    words = array.array("H", data)
    if sys.byteorder == "big":
        words.byteswap()
    total = sum(words)
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def checksum_ok(packet: bytes) -> bool:
    return _ones_sum(packet) == 0xFFFF


def build_packet(command: int, session_id: int, reply_id: int, payload: bytes = b"") -> bytes:
    """Header plus payload with the checksum every client packet has on the wire:
    the ones' complement of the ones'-complement sum of all LE words (§1.3)."""
    header = HEADER.pack(command, 0, session_id, reply_id)
    # The header is word-aligned, so the two sums can be added: this avoids
    # copying a multi-megabyte payload just to checksum it.
    total = _ones_sum(header) + _ones_sum(payload)
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return HEADER.pack(command, ~total & 0xFFFF, session_id, reply_id) + payload


def make_commkey(key: int, session_id: int, ticks: int = 50) -> bytes:
    """pyzk's make_commkey (commpro.c MakeKey), computed modulo 2**32 (§1.5)."""
    k = int(f"{key & 0xFFFFFFFF:032b}"[::-1], 2)
    b = struct.pack("<I", (k + session_id) & 0xFFFFFFFF)
    t = ticks & 0xFF
    return bytes((b[2] ^ 0x53 ^ t, b[3] ^ 0x4F ^ t, t, b[1] ^ 0x4B ^ t))


def _timehex(t: datetime) -> bytes:
    return bytes((t.year - 2000, t.month, t.day, t.hour, t.minute, t.second))


def _fit(text: str, size: int, encoding: str = "utf-8") -> bytes:
    """Text in `encoding` cut to `size` bytes without splitting a character; a
    character the encoding lacks becomes "?", as on a clock's keypad."""
    cut = text.encode(encoding, errors="replace")[:size]
    return cut.decode(encoding, errors="ignore").encode(encoding)


def _cstr(raw: bytes, encoding: str = "utf-8") -> str:
    return raw.split(b"\0", 1)[0].decode(encoding, errors="ignore")


def _numeric_id(user_id: str, fallback: int) -> int:
    # ZK6 records (UDP) carry the user id as a u32; a non-numeric id cannot be
    # represented there, so the slot number stands in for it.
    if user_id.isascii() and user_id.isdigit() and int(user_id) <= 0xFFFFFFFF:
        return int(user_id)
    return fallback


# --- Device data ----------------------------------------------------------------------


@dataclass(slots=True)
class UserRecord:
    uid: int
    user_id: str
    name: str = ""
    privilege: int = 0
    password: str = ""
    card: int = 0
    group_id: str = ""


@dataclass(slots=True)
class AttendanceRecord:
    user_id: str
    timestamp: datetime
    status: int = 1
    punch: int = 0


@dataclass(slots=True)
class FingerTemplate:
    uid: int
    fid: int
    valid: int
    template: bytes


_TIME_FORMAT = "%Y-%m-%d %H:%M:%S"

_FIRST_NAMES = (
    "Ana", "Bruno", "Carla", "Daniel", "Eduarda", "Felipe", "Gabriela", "Hugo", "Isabel",
    "João", "Karina", "Lucas", "Mariana", "Nuno", "Olívia", "Paulo", "Rafaela", "Sérgio",
    "Tatiana", "Vítor", "Beatriz", "Carlos", "Diana", "Fernando", "Helena", "Igor", "Júlia",
    "Leonardo", "Marta", "Pedro", "Renata", "Tiago", "Vanessa", "Miguel", "Sofia", "André",
)  # fmt: skip
_LAST_NAMES = (
    "Silva", "Santos", "Oliveira", "Souza", "Rodrigues", "Ferreira", "Alves", "Pereira",
    "Lima", "Gomes", "Costa", "Ribeiro", "Martins", "Carvalho", "Almeida", "Lopes", "Soares",
    "Fernandes", "Vieira", "Barbosa", "Rocha", "Dias", "Nunes", "Mendes", "Moreira", "Cardoso",
)  # fmt: skip

# Hours after shift start of the breaks added when a dense log is asked for:
# lunch first, then a morning and an afternoon coffee break.
_BREAK_HOURS = (4.0, 2.0, 6.5)


def _gauss_seconds(rng: random.Random, mean_min: float, sigma_min: float, limit_min: float) -> int:
    value = rng.gauss(mean_min, sigma_min)
    return int((max(-limit_min, min(limit_min, value)) + rng.random()) * 60)


class DeviceState:
    """The clock's data: identity, users, attendance log, fingerprint templates.

    Every method that reads or changes the data holds `lock`; code that walks the
    lists itself while the emulator runs must hold it too.
    """

    def __init__(
        self,
        *,
        serial_number: str = "EMU0001",
        firmware: str = "Ver 6.60 Apr 28 2017",
        device_name: str = "K40",
        platform: str = "ZMM220_TFT",
        mac: str = "00:17:61:c8:ec:17",
        comm_key: int = 0,
        users: list[UserRecord] | None = None,
        attendance: list[AttendanceRecord] | None = None,
        templates: list[FingerTemplate] | None = None,
        options: dict[str, str | None] | None = None,
    ):
        self.lock = threading.RLock()
        self.serial_number = serial_number
        self.firmware = firmware
        self.device_name = device_name
        self.platform = platform
        self.mac = mac
        self.comm_key = comm_key
        self.users = list(users or [])
        self.attendance = list(attendance or [])
        self.templates = list(templates or [])
        # Option values that override or extend the built-in ones; None makes a
        # key unknown, like on older firmware. OPTIONS_WRQ writes land here too.
        self.options = dict(options or {})

    # -- changes ---------------------------------------------------------------------

    def add_punch(
        self, *, user_id: str, timestamp: datetime, status: int = 1, punch: int = 0
    ) -> AttendanceRecord:
        record = AttendanceRecord(
            user_id=_check_user_id(user_id, "user_id"),
            timestamp=_check_timestamp(timestamp, "timestamp"),
            status=_check_int(status, 0, 255, "status"),
            punch=_check_int(punch, 0, 255, "punch"),
        )
        with self.lock:
            self.attendance.append(record)
        return record

    def upsert_user(self, user: UserRecord) -> None:
        """Adds the user, or replaces the one with the same uid (CMD_USER_WRQ)."""
        with self.lock:
            for index, existing in enumerate(self.users):
                if existing.uid == user.uid:
                    self.users[index] = user
                    return
            self.users.append(user)

    def delete_user(self, uid: int) -> bool:
        with self.lock:
            before = len(self.users)
            self.users = [u for u in self.users if u.uid != uid]
            self.templates = [t for t in self.templates if t.uid != uid]
            return len(self.users) != before

    def upsert_template(self, template: FingerTemplate) -> None:
        with self.lock:
            self.delete_template(template.uid, template.fid)
            self.templates.append(template)

    def delete_template(self, uid: int, fid: int) -> bool:
        with self.lock:
            before = len(self.templates)
            self.templates = [t for t in self.templates if (t.uid, t.fid) != (uid, fid)]
            return len(self.templates) != before

    def find_template(self, uid: int, fid: int) -> FingerTemplate | None:
        with self.lock:
            return next((t for t in self.templates if (t.uid, t.fid) == (uid, fid)), None)

    def user_by_user_id(self, user_id: str) -> UserRecord | None:
        with self.lock:
            return next((u for u in self.users if u.user_id == user_id), None)

    def clear_attendance(self) -> None:
        with self.lock:
            self.attendance = []

    def clear_all(self) -> None:
        with self.lock:
            self.users = []
            self.attendance = []
            self.templates = []

    def set_option(self, key: str, value: str) -> None:
        with self.lock:
            self.options[key] = value

    # -- JSON ------------------------------------------------------------------------

    def to_dict(self) -> dict:
        with self.lock:
            data = {
                "serial_number": self.serial_number,
                "firmware": self.firmware,
                "device_name": self.device_name,
                "platform": self.platform,
                "comm_key": self.comm_key,
                "mac": self.mac,
                "users": [
                    {
                        "uid": u.uid,
                        "user_id": u.user_id,
                        "name": u.name,
                        "privilege": u.privilege,
                        "password": u.password,
                        "card": u.card,
                        "group_id": u.group_id,
                    }
                    for u in self.users
                ],
                "attendance": [
                    {
                        "user_id": a.user_id,
                        "timestamp": a.timestamp.strftime(_TIME_FORMAT),
                        "status": a.status,
                        "punch": a.punch,
                    }
                    for a in self.attendance
                ],
                "templates": [
                    {"uid": t.uid, "fid": t.fid, "valid": t.valid, "template": t.template.hex()}
                    for t in self.templates
                ],
            }
            if self.options:
                data["options"] = dict(self.options)
            return data

    @classmethod
    def from_dict(cls, data: dict) -> "DeviceState":
        """Builds a state from the JSON format in docs/emulator.md.

        Raises ValueError naming the first field that is missing or wrong.
        """
        if not isinstance(data, dict):
            raise ValueError("the device data must be a JSON object")
        users = [_user_from_dict(u, f"users[{i}]") for i, u in enumerate(_list(data, "users"))]
        seen: set[int] = set()
        for i, user in enumerate(users):
            if user.uid in seen:
                raise ValueError(f"users[{i}].uid: uid {user.uid} is used twice")
            seen.add(user.uid)
        attendance = [
            _attendance_from_dict(a, f"attendance[{i}]")
            for i, a in enumerate(_list(data, "attendance"))
        ]
        templates = [
            _template_from_dict(t, f"templates[{i}]")
            for i, t in enumerate(_list(data, "templates"))
        ]
        options = data.get("options", {})
        if not isinstance(options, dict) or not all(
            isinstance(k, str) and (v is None or isinstance(v, str)) for k, v in options.items()
        ):
            raise ValueError("options: expected an object of string (or null) values")
        identity = {}
        for key in ("serial_number", "firmware", "device_name", "platform", "mac"):
            if key in data:
                if not isinstance(data[key], str) or not data[key]:
                    raise ValueError(f"{key}: expected a non-empty string")
                identity[key] = data[key]
        return cls(
            **identity,
            comm_key=_check_int(data.get("comm_key", 0), 0, 0xFFFFFFFF, "comm_key"),
            users=users,
            attendance=attendance,
            templates=templates,
            options=options,
        )

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), ensure_ascii=False, indent=1) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> "DeviceState":
        """Raises OSError if the file cannot be read, ValueError if it is not valid."""
        text = Path(path).read_text(encoding="utf-8")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not valid JSON: {exc}") from exc
        return cls.from_dict(data)

    # -- generation ------------------------------------------------------------------

    @classmethod
    def generate(
        cls,
        users: int = 50,
        punches: int = 5000,
        days: int = 30,
        seed: int = 1,
        *,
        now: datetime | None = None,
    ) -> "DeviceState":
        """A realistic clock: `users` employees and exactly `punches` records.

        Day workers clock in around 07:30-09:00 and out nine hours later on
        weekdays, a few night workers do 22:00-06:00; some punches are missing,
        some doubled within 30 s. Verification is by fingerprint (status 1) or
        face (15); punch is 0 in, 1 out (2/3 for breaks when the requested count
        needs more than two punches per shift). Records fall within the `days`
        days before `now` (the device clock; default: this computer's clock), the
        newest days first: if fewer punches are asked for than the schedule
        makes, the log starts later. Same arguments, same data.
        """
        _check_int(users, 1, 65534, "users")
        _check_int(punches, 0, 10_000_000, "punches")
        _check_int(days, 1, 3650, "days")
        rng = random.Random(seed)
        now = (now or datetime.now()).replace(microsecond=0)
        window_start = now - timedelta(days=days)

        people = []
        user_records = []
        templates = []
        for uid in range(1, users + 1):
            user = UserRecord(
                uid=uid,
                user_id=str(1000 + uid),
                name=f"{rng.choice(_FIRST_NAMES)} {rng.choice(_LAST_NAMES)}",
                privilege=14 if uid == 1 else 0,
                card=rng.randrange(1_000_000, 16_000_000) if rng.random() < 0.3 else 0,
            )
            user_records.append(user)
            night = uid % 15 == 0  # a few night workers
            start_minute = 22 * 60 if night else rng.choice((450, 480, 480, 480, 510, 540))
            status = 15 if rng.random() < 0.3 else 1
            people.append((user.user_id, night, start_minute, status))
            if status == 1:
                for fid in (0, 5) if rng.random() < 0.5 else (0,):
                    body = rng.randbytes(rng.randrange(480, 900))
                    # pyzk strips six trailing NULs from a template it reads
                    # back, so a template never ends with zeros here.
                    templates.append(FingerTemplate(uid, fid, 1, body + b"\x01"))

        # Shifts get breaks (2 more punches each) only as often as the requested
        # count needs, aiming a little high so the log is trimmed, not padded.
        # At least one: a window that holds only a weekend still gets its few shifts.
        weekdays = max(
            1, sum(1 for k in range(days + 1) if (now.date() - timedelta(k)).weekday() < 5)
        )
        extra_per_shift = max(0.0, 1.08 * punches / (users * weekdays * 0.95) - 2) / 2
        max_breaks = len(_BREAK_HOURS)

        log: list[AttendanceRecord] = []
        for k in range(days + 2):
            if len(log) >= punches:
                break
            day = now.date() - timedelta(k)
            midnight = datetime.combine(day, dtime())
            for user_id, night, start_minute, status in people:
                if not _works(rng, night, day):
                    continue
                breaks = int(extra_per_shift) + (rng.random() < extra_per_shift % 1)
                shift = _shift(rng, midnight, night, start_minute, min(breaks, max_breaks))
                for ts, punch in shift:
                    if rng.random() < 0.03 or not window_start <= ts <= now:
                        continue
                    log.append(AttendanceRecord(user_id, ts, status, punch))
                    if rng.random() < 0.02:
                        tap = ts + timedelta(seconds=rng.randint(2, 30))
                        if tap <= now:
                            log.append(AttendanceRecord(user_id, tap, status, punch))
        log.sort(key=lambda r: r.timestamp)
        del log[: max(0, len(log) - punches)]
        _fill_with_double_taps(rng, log, punches, people, window_start, now)
        return cls(users=user_records, attendance=log, templates=templates)


def _works(rng: random.Random, night: bool, day: date) -> bool:
    if rng.random() < 0.03:
        return False  # absent
    if night:
        return day.weekday() in (6, 0, 1, 2, 3)
    return day.weekday() < 5 or (day.weekday() == 5 and rng.random() < 0.1)


def _shift(
    rng: random.Random, midnight: datetime, night: bool, start_minute: int, breaks: int
) -> list[tuple[datetime, int]]:
    start = midnight + timedelta(minutes=start_minute)
    end = start + timedelta(hours=8 if night else 9)
    punches = [
        (start + timedelta(seconds=_gauss_seconds(rng, -5, 7, 40)), 0),
        (end + timedelta(seconds=_gauss_seconds(rng, 6, 10, 60)), 1),
    ]
    for i in range(breaks):
        out = start + timedelta(hours=_BREAK_HOURS[i], seconds=_gauss_seconds(rng, 0, 8, 30))
        back = out + timedelta(minutes=rng.randint(40, 65) if i == 0 else rng.randint(10, 20))
        punches += [(out, 2), (back, 3)]
    return punches


def _fill_with_double_taps(rng, log, punches, people, window_start, now):
    # Only reached when the schedule cannot make as many punches as asked for
    # (a tiny window, or more punches than shifts allow): the rest become
    # double taps, which real logs have plenty of.
    originals = list(log)
    span = int((now - window_start).total_seconds())
    while len(log) < punches:
        if originals:
            source = rng.choice(originals)
            offset = timedelta(seconds=rng.randint(2, 30))
            tap = source.timestamp + offset
            if tap > now:
                tap = source.timestamp - offset
            log.append(AttendanceRecord(source.user_id, tap, source.status, source.punch))
        else:
            user_id, _night, _start, status = rng.choice(people)
            ts = window_start + timedelta(seconds=rng.randint(0, span))
            originals.append(AttendanceRecord(user_id, ts, status, rng.randint(0, 1)))
            log.append(originals[-1])
    log.sort(key=lambda r: r.timestamp)


# --- Validation of loaded data --------------------------------------------------------


def _list(data: dict, key: str) -> list:
    value = data.get(key, [])
    if not isinstance(value, list):
        raise ValueError(f"{key}: expected a list")
    return value


def _check_int(value, low: int, high: int, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{where}: expected an integer from {low} to {high}, got {value!r}")
    return value


def _check_str(value, max_bytes: int, where: str) -> str:
    if not isinstance(value, str) or len(value.encode()) > max_bytes:
        raise ValueError(f"{where}: expected a string of at most {max_bytes} bytes, got {value!r}")
    return value


def _check_user_id(value, where: str) -> str:
    if not _check_str(value, 24, where):
        raise ValueError(f"{where}: the user id must not be empty")
    return value


def _check_timestamp(value, where: str) -> datetime:
    if isinstance(value, str):
        try:
            value = datetime.strptime(value, _TIME_FORMAT)
        except ValueError as exc:
            raise ValueError(f"{where}: expected 'YYYY-MM-DD HH:MM:SS', got {value!r}") from exc
    if not isinstance(value, datetime) or value.tzinfo is not None:
        raise ValueError(f"{where}: expected a naive device-local datetime, got {value!r}")
    if not 2000 <= value.year <= 2099:
        raise ValueError(f"{where}: the clock only stores years 2000-2099, got {value.year}")
    return value.replace(microsecond=0)


def _fields(item, where: str, required: tuple[str, ...]) -> dict:
    if not isinstance(item, dict):
        raise ValueError(f"{where}: expected an object")
    missing = [key for key in required if key not in item]
    if missing:
        raise ValueError(f"{where}: missing {', '.join(missing)}")
    return item


def _user_from_dict(item, where: str) -> UserRecord:
    item = _fields(item, where, ("uid", "user_id"))
    return UserRecord(
        uid=_check_int(item["uid"], 1, 65535, f"{where}.uid"),
        user_id=_check_user_id(item["user_id"], f"{where}.user_id"),
        name=_check_str(item.get("name", ""), 24, f"{where}.name"),
        privilege=_check_int(item.get("privilege", 0), 0, 255, f"{where}.privilege"),
        password=_check_str(item.get("password", ""), 8, f"{where}.password"),
        card=_check_int(item.get("card", 0), 0, 0xFFFFFFFF, f"{where}.card"),
        group_id=_check_str(item.get("group_id", ""), 7, f"{where}.group_id"),
    )


def _attendance_from_dict(item, where: str) -> AttendanceRecord:
    item = _fields(item, where, ("user_id", "timestamp"))
    return AttendanceRecord(
        user_id=_check_user_id(item["user_id"], f"{where}.user_id"),
        timestamp=_check_timestamp(item["timestamp"], f"{where}.timestamp"),
        status=_check_int(item.get("status", 1), 0, 255, f"{where}.status"),
        punch=_check_int(item.get("punch", 0), 0, 255, f"{where}.punch"),
    )


def _template_from_dict(item, where: str) -> FingerTemplate:
    item = _fields(item, where, ("uid", "fid", "template"))
    try:
        body = bytes.fromhex(item["template"])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}.template: expected a hex string") from exc
    if not body:
        raise ValueError(f"{where}.template: must not be empty")
    return FingerTemplate(
        uid=_check_int(item["uid"], 1, 65535, f"{where}.uid"),
        fid=_check_int(item["fid"], 0, 9, f"{where}.fid"),
        valid=_check_int(item.get("valid", 1), 0, 127, f"{where}.valid"),
        template=body,
    )


# --- Record layouts (§4) --------------------------------------------------------------

_USER72 = struct.Struct("<HB8s24sIB7sx24s")
_ATT40 = struct.Struct("<H24sBIB8s")
_ATT16 = struct.Struct("<IIBB2sI")
# ZEM500/MA300: uid, status, punch, time, the layout captures from real devices
# show (pyzk issues #56, #92, #99); pyzk itself reads the time one byte early.
_ATT8 = struct.Struct("<HBBI")
# SpeedFace firmware: the 40-byte layout and 9 more bytes (pyzk PR #166).
_ATT49_TAIL = bytes(9)
RECORD_SIZES = (8, 16, 40, 49)
# zk-protocol data-record.md shows these eight trailing bytes on real records.
_ATT40_TAIL = b"\0\0\0\0\xff\0\0\0"
_TEMPLATE_HEAD = struct.Struct("<HHbb")
_EVENT52 = struct.Struct("<24sBB6s20s")
_EVENT12 = struct.Struct("<IBB6s")
_UPLOAD_TABLE = struct.Struct("<bHbI")


def _with_size(body: bytes) -> bytes:
    return struct.pack("<I", len(body)) + body


def _users_blob(users: list[UserRecord], tcp: bool, encoding: str = "utf-8") -> bytes:
    if tcp:
        body = b"".join(
            _USER72.pack(
                u.uid,
                u.privilege,
                _fit(u.password, 8),
                _fit(u.name, 24, encoding),
                u.card,
                1,  # zk-protocol: a fixed 01 after the card on real records
                _fit(u.group_id, 7),
                _fit(u.user_id, 24),
            )
            for u in users
        )
    else:
        body = b"".join(
            USER_28.pack(
                u.uid,
                u.privilege,
                _fit(u.password, 5),
                _fit(u.name, 8, encoding),
                u.card,
                int(u.group_id) if u.group_id.isdigit() and int(u.group_id) < 256 else 0,
                0,
                _numeric_id(u.user_id, u.uid),
            )
            for u in users
        )
    return _with_size(body)


def _attendance_blob(records: list[AttendanceRecord], users: list[UserRecord], size: int) -> bytes:
    uids = {u.user_id: u.uid for u in users}
    if size in (40, 49):
        encoded_ids = {user_id: _fit(user_id, 24) for user_id in {r.user_id for r in records}}
        tail = b"" if size == 40 else _ATT49_TAIL
        body = b"".join(
            _ATT40.pack(
                uids.get(r.user_id, 0),
                encoded_ids[r.user_id],
                r.status,
                encode_time(r.timestamp),
                r.punch,
                _ATT40_TAIL,
            )
            + tail
            for r in records
        )
    elif size == 8:
        # Only the uid: a record whose user id names no user on the clock (a
        # deleted user) carries that id as its uid when it fits in 16 bits.
        body = b"".join(
            _ATT8.pack(
                uids.get(r.user_id, _numeric_id(r.user_id, 0) & 0xFFFF),
                r.status,
                r.punch,
                encode_time(r.timestamp),
            )
            for r in records
        )
    else:
        body = b"".join(
            _ATT16.pack(
                _numeric_id(r.user_id, uids.get(r.user_id, 0)),
                encode_time(r.timestamp),
                r.status,
                r.punch,
                b"\0\0",
                0,
            )
            for r in records
        )
    return _with_size(body)


def _templates_blob(templates: list[FingerTemplate]) -> bytes:
    body = b"".join(
        _TEMPLATE_HEAD.pack(len(t.template) + 6, t.uid, t.fid, t.valid) + t.template
        for t in sorted(templates, key=lambda t: (t.uid, t.fid))
    )
    return _with_size(body)


def _user_from_wire(payload: bytes, encoding: str = "utf-8") -> UserRecord:
    # pyzk sends 72-byte records over TCP but 28-byte ones over UDP until its
    # first get_users(), so the length decides, not the transport (§4.1).
    if len(payload) >= USER_72.size:
        uid, privilege, password, name, card, group_id, user_id = USER_72.unpack_from(payload)
        return UserRecord(
            uid=uid,
            user_id=_cstr(user_id) or str(uid),
            name=_cstr(name, encoding).strip(),
            privilege=privilege,
            password=_cstr(password),
            card=card,
            group_id=_cstr(group_id).strip(),
        )
    uid, privilege, password, name, card, group_id, _tz, user_id = USER_28.unpack_from(payload)
    return UserRecord(
        uid=uid,
        user_id=str(user_id or uid),
        name=_cstr(name, encoding).strip(),
        privilege=privilege,
        password=_cstr(password),
        card=card,
        group_id=str(group_id) if group_id else "",
    )


def _parse_upload(
    buffer: bytes, tcp: bool, encoding: str = "utf-8"
) -> tuple[list[UserRecord], list[FingerTemplate]]:
    """The users + fingerprint table + templates buffer of save_user_template (§2.5).

    Raises ValueError (or struct.error) when the buffer does not add up.
    """
    users_len, table_len, fingers_len = struct.unpack_from("<III", buffer)
    if 12 + users_len + table_len + fingers_len != len(buffer):
        raise ValueError("the section sizes do not add up to the buffer")
    users_part = buffer[12 : 12 + users_len]
    table = buffer[12 + users_len : 12 + users_len + table_len]
    fingers = buffer[12 + users_len + table_len :]
    fits73, fits29 = users_len % 73 == 0, users_len % 29 == 0
    if not (fits73 or fits29) or table_len % _UPLOAD_TABLE.size:
        raise ValueError("odd section sizes")
    # Each user record is a 0x02 flag byte followed by the USER_WRQ layout.
    size = 73 if fits73 and (tcp or not fits29) else 29
    users = [
        _user_from_wire(users_part[i + 1 : i + size], encoding) for i in range(0, users_len, size)
    ]
    templates = []
    for _flag, uid, finger_flag, offset in _UPLOAD_TABLE.iter_unpack(table):
        (size,) = struct.unpack_from("<H", fingers, offset)
        body = fingers[offset + 2 : offset + 2 + size]
        if len(body) != size or not body:
            raise ValueError("a template runs past the buffer")
        templates.append(FingerTemplate(uid, finger_flag & 0x0F, 1, body))
    return users, templates


# --- Sessions ---------------------------------------------------------------------


class _ClientGone(Exception):
    """The connection was dropped on purpose (drop_after_bytes)."""


class _Stalled(Exception):
    """The device stopped answering mid-reply on purpose (stall_after_bytes)."""


class _Session:
    """One client's conversation: a TCP connection, or the datagrams of a UDP peer.

    Only the thread serving the client calls handle() and flush_event(), so
    replies and pushed events never interleave on the wire.
    """

    def __init__(self, emulator: "ZKEmulator", peer: tuple, *, tcp: bool, send, local_ip: str):
        self._emu = emulator
        self.tcp = tcp
        self._send = send
        self._local_ip = local_ip
        self.label = f"{'tcp' if tcp else 'udp'} {peer[0]}:{peer[1]}"
        self.session_id = 0
        self.authenticated = False
        self.event_flags = 0
        self.closing = False
        self._buffer: bytes | None = None
        self._upload: bytearray | None = None
        self._upload_size = 0
        # Bounded: a client that registers and never acknowledges misses punches.
        self._events: deque[AttendanceRecord] = deque(maxlen=MAX_QUEUED_EVENTS)
        self._event_ack_deadline = 0.0
        self._reply_id = 0
        self._reply_code: int | None = None

    # -- inbound ---------------------------------------------------------------------

    def handle(self, packet: bytes) -> None:
        if len(packet) < HEADER.size:
            logger.debug("%s: ignored a %d-byte packet (no header)", self.label, len(packet))
            return
        command, _checksum, _session, reply_id = HEADER.unpack_from(packet)
        if not checksum_ok(packet):
            logger.debug("%s: bad checksum on command %d, answering anyway", self.label, command)
        if command == CMD_ACK_OK:
            # The client acknowledging a pushed event: a real clock never answers it.
            self._event_ack_deadline = 0.0
            return
        payload = packet[HEADER.size :]
        self._reply_id = reply_id
        self._reply_code = None
        self._emu._wait_before_reply()
        if self.authenticated or command in (CMD_CONNECT, CMD_AUTH):
            try:
                self._HANDLERS.get(command, _Session._on_unknown)(self, payload)
            except (_ClientGone, OSError):
                raise
            except Exception:
                # One bad request must not end the conversation, let alone the server.
                logger.exception("%s: command %d failed", self.label, command)
                if self._reply_code is None:
                    self._error()
        else:
            self._frame(CMD_ACK_UNAUTH)
        logger.info(
            "%s session %d: %s (%d), %d payload bytes -> %s",
            self.label,
            self.session_id,
            _COMMAND_NAMES.get(command, "unknown"),
            command,
            len(payload),
            _COMMAND_NAMES.get(self._reply_code, "no reply"),
        )

    # -- outbound --------------------------------------------------------------------

    def _frame(self, command: int, payload: bytes = b"", *, session_id=None, reply_id=None):
        packet = build_packet(
            command,
            self.session_id if session_id is None else session_id,
            self._reply_id if reply_id is None else reply_id,
            payload,
        )
        self._send(packet)
        if self._reply_code is None:
            self._reply_code = command

    def _ok(self, payload: bytes = b"") -> None:
        self._frame(CMD_ACK_OK, payload)

    def _error(self) -> None:
        self._frame(CMD_ACK_ERROR)

    def _send_in_pieces(self, data: bytes) -> None:
        """PREPARE_DATA, DATA..., ACK_OK: one 1504 chunk, or a big UDP template."""
        self._frame(CMD_PREPARE_DATA, struct.pack("<II", len(data), PREPARE_PIECE_SIZE))
        if self.tcp:
            self._emu._pause(CHUNK_FRAME_GAP)
            if data:
                self._frame(CMD_DATA, data)
                self._emu._pause(CHUNK_FRAME_GAP)
            self._ok()
            self._emu._pause(CHUNK_FRAME_GAP)
        else:
            for start in range(0, len(data), UDP_DATA_PIECE):
                self._frame(CMD_DATA, data[start : start + UDP_DATA_PIECE])
            self._ok()

    # -- live events -----------------------------------------------------------------

    def queue_event(self, record: AttendanceRecord) -> None:
        if self.event_flags & EF_ATTLOG:
            self._events.append(record)

    def flush_event(self) -> None:
        """Pushes one queued event if the client acknowledged the previous one."""
        if not self._events or time.monotonic() < self._event_ack_deadline:
            return
        if not self.event_flags & EF_ATTLOG:
            # Unregistered (REG_EVENT 0) with punches still queued: an event
            # racing in now would be read as the reply to the client's next
            # command (§2.3).
            self._events.clear()
            return
        record = self._events.popleft()
        if self.tcp:
            user_id = _fit(record.user_id, 24)
            payload = _EVENT52.pack(
                user_id, record.status, record.punch, _timehex(record.timestamp), b""
            )
        else:
            user = self._emu.state.user_by_user_id(record.user_id)
            payload = _EVENT12.pack(
                _numeric_id(record.user_id, user.uid if user else 0),
                record.status,
                record.punch,
                _timehex(record.timestamp),
            )
        # Events carry the event code in the session field and reply id 0 (§2.3).
        self._reply_code = None
        self._frame(CMD_REG_EVENT, payload, session_id=EF_ATTLOG, reply_id=0)
        self._event_ack_deadline = time.monotonic() + EVENT_ACK_WAIT
        logger.info(
            "%s session %d: pushed a live punch of %s", self.label, self.session_id, record.user_id
        )

    # -- commands --------------------------------------------------------------------

    def _on_connect(self, payload: bytes) -> None:
        self.session_id = self._emu._new_session_id()
        self.event_flags = 0
        self._events.clear()
        self._buffer = None
        self.authenticated = not self._emu.comm_key
        self._frame(CMD_ACK_OK if self.authenticated else CMD_ACK_UNAUTH)

    def _on_auth(self, payload: bytes) -> None:
        expected = make_commkey(
            self._emu.comm_key, self.session_id, payload[2] if len(payload) > 2 else 0
        )
        self.authenticated = bool(self.session_id) and payload[:4] == expected
        self._frame(CMD_ACK_OK if self.authenticated else CMD_ACK_UNAUTH)

    def _on_exit(self, payload: bytes) -> None:
        self._ok()
        self.closing = True

    def _on_enable(self, payload: bytes) -> None:
        self._emu._set_enabled(True, "enable")
        self._ok()

    def _on_disable(self, payload: bytes) -> None:
        self._emu._set_enabled(False, "disable")
        self._ok()

    def _on_restart(self, payload: bytes) -> None:
        # The clock reboots: it drops this connection and comes back enabled.
        self._emu._set_enabled(True, "restart")
        self._ok()
        self.closing = True

    def _on_version(self, payload: bytes) -> None:
        self._ok(self._emu.state.firmware.encode() + b"\0")

    def _on_options_read(self, payload: bytes) -> None:
        # pyzk sends keys with a trailing NUL, zkteco-js without one (§5).
        key = _cstr(payload).strip()
        value = self._options().get(key)
        if value is None:
            self._error()
        else:
            self._ok(f"{key}={value}\0".encode())

    def _options(self) -> dict[str, str | None]:
        state = self._emu.state
        extended = "1" if self.tcp else "0"
        options = {
            "~SerialNumber": state.serial_number,
            "~Platform": state.platform,
            "MAC": state.mac,
            "~DeviceName": state.device_name,
            "~OEMVendor": "ZKTeco Inc.",
            "~ProductTime": "2017-04-28 10:31:04",
            "~OS": "1",
            "~ZKFPVersion": "10",
            "ZKFaceVersion": "0",
            "FaceFunOn": "0",
            # What this session is served: extended records over TCP only.
            "~ExtendFmt": extended,
            "~UserExtFmt": extended,
            "CompatOldFirmware": "0",
            "~PIN2Width": str(PIN_WIDTH),
            "WorkCode": "0",
            "~SSR": "1",
            "IPAddress": self._local_ip,
            "NetMask": "255.255.255.0",
            "GATEIPAddress": "0.0.0.0",
        }
        with state.lock:
            options.update(state.options)
        return options

    def _on_options_write(self, payload: bytes) -> None:
        key, sep, value = payload.split(b"\0", 1)[0].decode(errors="replace").partition("=")
        if not sep or not key.strip():
            self._error()
            return
        self._emu.state.set_option(key.strip(), value)
        self._ok()

    def _on_pin_width(self, payload: bytes) -> None:
        # pyzk reads a binary byte: ASCII "9" would give 57 (§2).
        self._ok(bytes((PIN_WIDTH,)))

    def _on_free_sizes(self, payload: bytes) -> None:
        state = self._emu.state
        with state.lock:
            users, fingers, records = len(state.users), len(state.templates), len(state.attendance)
            admins = sum(1 for u in state.users if u.privilege & 0x0E == 0x0E)
            passwords = sum(1 for u in state.users if u.password)
        user_cap = max(USER_CAPACITY, users)
        finger_cap = max(FINGER_CAPACITY, fingers)
        record_cap = max(RECORD_CAPACITY, records)
        fields = (
            0, 0, 0, 0, users, 0, fingers, 0, records, 0, 0, 0, admins, passwords,
            finger_cap, user_cap, record_cap,
            finger_cap - fingers, user_cap - users, record_cap - records,
            0, 0, 0,  # faces, -, face capacity
        )  # fmt: skip
        # punch_during_read: someone punches just after the counts were taken
        # (before they are sent, so it is done before the client reads them).
        self._emu._someone_punches()
        self._ok(struct.pack("<23i", *fields))

    def _on_get_time(self, payload: bytes) -> None:
        self._ok(struct.pack("<I", encode_time(self._emu.device_now())))

    def _on_set_time(self, payload: bytes) -> None:
        try:
            when = decode_time(struct.unpack_from("<I", payload)[0])
        except (struct.error, ValueError):
            self._error()
            return
        self._emu.set_device_time(when)
        self._ok()

    def _on_user_write(self, payload: bytes) -> None:
        if len(payload) < USER_28.size:
            self._error()
            return
        self._emu.state.upsert_user(_user_from_wire(payload, self._emu.encoding))
        self._ok()

    def _on_delete_user(self, payload: bytes) -> None:
        if len(payload) < 2:
            self._error()
            return
        # Deleting a uid that is not there succeeds, so retries are harmless.
        self._emu.state.delete_user(struct.unpack_from("<H", payload)[0])
        self._ok()

    def _on_delete_template(self, payload: bytes) -> None:
        if len(payload) < 3:
            self._error()
            return
        uid, fid = struct.unpack_from("<HB", payload)
        if self._emu.state.delete_template(uid, fid):
            self._ok()
        else:
            self._error()

    def _on_delete_template_by_user_id(self, payload: bytes) -> None:
        if len(payload) < 25:
            self._error()
            return
        user = self._emu.state.user_by_user_id(_cstr(payload[:24]))
        if user and self._emu.state.delete_template(user.uid, payload[24]):
            self._ok()
        else:
            self._error()

    def _on_clear_attendance(self, payload: bytes) -> None:
        self._emu.state.clear_attendance()
        self._ok()

    def _on_clear_data(self, payload: bytes) -> None:
        self._emu.state.clear_all()
        self._ok()

    def _on_unlock(self, payload: bytes) -> None:
        tenths = struct.unpack("<I", payload[:4].ljust(4, b"\0"))[0]
        self._emu.unlock_door(tenths / 10)
        self._ok()

    def _on_door_state(self, payload: bytes) -> None:
        # pyzk HEAD's get_lock_state() is True on ACK_OK: here that means the
        # door is unlocked (within an UNLOCK's time).
        if self._emu.door_unlocked():
            self._ok()
        else:
            self._error()

    def _on_reg_event(self, payload: bytes) -> None:
        self.event_flags = int.from_bytes(payload[:4], "little")
        self._ok()

    def _on_ack(self, payload: bytes) -> None:
        self._ok()

    def _on_free_data(self, payload: bytes) -> None:
        self._buffer = None
        self._upload = None
        self._ok()

    def _on_prepare_buffer(self, payload: bytes) -> None:
        if len(payload) < 11:
            self._error()
            return
        # Dispatch on the inner command: attendance is asked for with fct 0 (§3.1).
        inner, fct = struct.unpack_from("<hi", payload, 1)
        table = {CMD_USERTEMP_RRQ: "users", CMD_ATTLOG_RRQ: "attendance"}.get(inner)
        if inner == CMD_DB_RRQ:
            table = {FCT_FINGERTMP: "templates", FCT_USER: "users", FCT_ATTLOG: "attendance"}.get(
                fct
            )
        if table is None:
            self._error()
            return
        state = self._emu.state
        with state.lock:
            if table == "users":
                blob = _users_blob(state.users, self.tcp, self._emu.encoding)
            elif table == "attendance":
                blob = _attendance_blob(
                    state.attendance, state.users, self._emu.record_size(self.tcp)
                )
            else:
                blob = _templates_blob(state.templates)
        if self.tcp and not self._emu.chunked:
            # Form A: the whole table in one DATA frame, any size (§3.2).
            self._buffer = None
            self._frame(CMD_DATA, blob)
        else:
            # Form B: the size now, the data through 1504 reads of this snapshot.
            self._buffer = blob
            self._ok(struct.pack("<BIII", 0, len(blob), len(blob), 0))

    def _on_read_buffer(self, payload: bytes) -> None:
        if len(payload) < 8 or self._buffer is None:
            self._error()
            return
        start, size = struct.unpack_from("<ii", payload)
        if start < 0 or size < 0 or start > len(self._buffer):
            self._error()
            return
        self._send_in_pieces(self._buffer[start : start + size])
        if start + size < len(self._buffer):
            # punch_during_read: someone punches between two chunks of a bulk read.
            self._emu._someone_punches()

    def _on_get_template(self, payload: bytes) -> None:
        if len(payload) < 3:
            self._error()
            return
        uid, fid = struct.unpack_from("<HB", payload)
        template = self._emu.state.find_template(uid, fid)
        if template is None:
            self._error()
            return
        # pyzk drops the last byte of what it receives.
        data = template.template + bytes((template.valid,))
        if self.tcp or len(data) <= UDP_DATA_PIECE:
            self._frame(CMD_DATA, data)
        else:
            self._send_in_pieces(data)

    def _on_upload_prepare(self, payload: bytes) -> None:
        if len(payload) < 4 or int.from_bytes(payload[:4], "little") > MAX_UPLOAD:
            self._error()
            return
        self._upload = bytearray()
        self._upload_size = int.from_bytes(payload[:4], "little")
        self._ok()

    def _on_upload_data(self, payload: bytes) -> None:
        if self._upload is None or len(self._upload) + len(payload) > self._upload_size:
            self._error()
            return
        self._upload += payload
        self._ok()

    def _on_save_user_templates(self, payload: bytes) -> None:
        if self._upload is None or len(self._upload) != self._upload_size:
            self._error()
            return
        try:
            users, templates = _parse_upload(bytes(self._upload), self.tcp, self._emu.encoding)
        except (ValueError, struct.error) as exc:
            logger.debug("%s: rejected an upload: %s", self.label, exc)
            self._error()
            return
        finally:
            self._upload = None
        state = self._emu.state
        with state.lock:
            for user in users:
                state.upsert_user(user)
            for template in templates:
                state.upsert_template(template)
        self._ok()

    def _on_unknown(self, payload: bytes) -> None:
        # Also the answer to pyzk's _clear_error, which sends ACK_ERROR and
        # ACK_UNKNOWN as commands and waits for one reply to each (§2).
        self._frame(CMD_ACK_UNKNOWN)

    _HANDLERS = {
        CMD_CONNECT: _on_connect,
        CMD_AUTH: _on_auth,
        CMD_EXIT: _on_exit,
        CMD_ENABLEDEVICE: _on_enable,
        CMD_DISABLEDEVICE: _on_disable,
        CMD_RESTART: _on_restart,
        CMD_POWEROFF: _on_restart,
        CMD_GET_VERSION: _on_version,
        CMD_OPTIONS_RRQ: _on_options_read,
        CMD_OPTIONS_WRQ: _on_options_write,
        CMD_GET_PINWIDTH: _on_pin_width,
        CMD_GET_FREE_SIZES: _on_free_sizes,
        CMD_GET_TIME: _on_get_time,
        CMD_SET_TIME: _on_set_time,
        CMD_USER_WRQ: _on_user_write,
        CMD_DELETE_USER: _on_delete_user,
        CMD_DELETE_USERTEMP: _on_delete_template,
        CMD_DEL_USER_TEMP: _on_delete_template_by_user_id,
        CMD_CLEAR_ATTLOG: _on_clear_attendance,
        CMD_CLEAR_DATA: _on_clear_data,
        CMD_UNLOCK: _on_unlock,
        CMD_DOORSTATE_RRQ: _on_door_state,
        CMD_REG_EVENT: _on_reg_event,
        CMD_REFRESHDATA: _on_ack,
        CMD_REFRESHOPTION: _on_ack,
        CMD_TESTVOICE: _on_ack,
        CMD_ENABLE_CLOCK: _on_ack,
        CMD_STARTVERIFY: _on_ack,
        CMD_CANCELCAPTURE: _on_ack,
        CMD_WRITE_LCD: _on_ack,
        CMD_CLEAR_LCD: _on_ack,
        CMD_FREE_DATA: _on_free_data,
        CMD_PREPARE_BUFFER: _on_prepare_buffer,
        CMD_READ_BUFFER: _on_read_buffer,
        CMD_GET_USERTEMP: _on_get_template,
        CMD_PREPARE_DATA: _on_upload_prepare,
        CMD_DATA: _on_upload_data,
        CMD_SAVE_USERTEMPS: _on_save_user_templates,
    }


class _TcpFrames:
    """Cuts a TCP byte stream into ZK packets, skipping bytes that are not framed."""

    def __init__(self, label: str):
        self._label = label
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        packets = []
        while True:
            start = self._buffer.find(TCP_MAGIC)
            if start < 0:
                # Keep a tail that may be the start of a magic split across reads.
                self._skip(max(0, len(self._buffer) - len(TCP_MAGIC) + 1))
                return packets
            self._skip(start)
            if len(self._buffer) < 8:
                return packets
            length = int.from_bytes(self._buffer[4:8], "little")
            if length > MAX_INBOUND_PACKET:
                self._skip(len(TCP_MAGIC))
                continue
            if len(self._buffer) < 8 + length:
                return packets
            packets.append(bytes(self._buffer[8 : 8 + length]))
            del self._buffer[: 8 + length]

    def _skip(self, count: int) -> None:
        if count:
            logger.debug("%s: skipped %d unframed bytes", self._label, count)
            del self._buffer[:count]


# --- The emulator -------------------------------------------------------------------


class ZKEmulator:
    """Serves a DeviceState over TCP and UDP on one port until stop().

    `comm_key` None uses the state's key. `encoding` is the code page user
    names are stored in (UTF-8 on current firmware). `record_size` picks the
    attendance record layout (8, 16, 40 or 49 bytes) on both transports; None
    serves 40 over TCP and 16 over UDP.

    Faults: `drop_after_bytes` resets a TCP connection once that many bytes were
    sent on it, `stall_after_bytes` stops sending there but keeps the connection
    open (a hung device), `delay_ms` sleeps before every reply, `silent` reads
    everything and answers nothing. `punch_during_read`: someone punches right
    after each GET_FREE_SIZES reply and between the 1504 chunks of a bulk read;
    while the clock is disabled the punch is refused and made again the moment
    it is enabled, unless `ignore_disable` (firmware that records while
    disabled). `live_interval` seconds: while the device is enabled, a random
    user punches that often, whether or not a client listens; the punch goes
    into the log and to every client registered for attendance events.
    `clock_offset` seconds is added to this computer's clock to make the
    device clock.
    """

    def __init__(
        self,
        state: DeviceState,
        host: str = "127.0.0.1",
        port: int = 0,
        comm_key: int | None = None,
        chunked: bool = False,
        drop_after_bytes: int | None = None,
        stall_after_bytes: int | None = None,
        delay_ms: float = 0,
        silent: bool = False,
        live_interval: float | None = None,
        clock_offset: float = 0.0,
        encoding: str = "utf-8",
        record_size: int | None = None,
        punch_during_read: bool = False,
        ignore_disable: bool = False,
    ):
        self.state = state
        try:
            codecs.lookup(encoding)
        except LookupError:
            raise ValueError(f"encoding: unknown encoding {encoding!r}") from None
        self.encoding = encoding
        if record_size is not None and record_size not in RECORD_SIZES:
            raise ValueError(
                f"record_size: expected one of {', '.join(map(str, RECORD_SIZES))}, "
                f"got {record_size!r}"
            )
        self._record_size = record_size
        self.punch_during_read = punch_during_read
        self.ignore_disable = ignore_disable
        self._host = host
        self._requested_port = _check_int(port, 0, 65535, "port")
        self.comm_key = _check_int(
            state.comm_key if comm_key is None else comm_key, 0, 0xFFFFFFFF, "comm_key"
        )
        self.chunked = chunked
        if drop_after_bytes is not None:
            _check_int(drop_after_bytes, 0, 2**62, "drop_after_bytes")
        self.drop_after_bytes = drop_after_bytes
        if stall_after_bytes is not None:
            _check_int(stall_after_bytes, 0, 2**62, "stall_after_bytes")
        self.stall_after_bytes = stall_after_bytes
        if delay_ms < 0:
            raise ValueError("delay_ms: must not be negative")
        self.delay_ms = delay_ms
        self.silent = silent
        if live_interval is not None and live_interval <= 0:
            raise ValueError("live_interval: must be a positive number of seconds")
        self.live_interval = live_interval
        self.clock_offset = float(clock_offset)
        try:
            year = self.device_now().year
        except OverflowError:
            year = 0
        if not 2000 <= year <= 2099:
            raise ValueError("clock_offset: the device clock must stay within 2000-2099")
        self.enabled = True
        # "disable", "enable", "restart" as clients send them, oldest first.
        self.enable_log: list[str] = []
        # punch_during_read: punches made (in the log) and refused while disabled.
        self.punches_during_read = 0
        self._waiting: list[str] = []
        self._next_reader_punch = 0
        self._last_reader_punch: datetime | None = None
        self._door_unlocked_until = 0.0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._started = False
        self._tcp_sock: socket.socket | None = None
        self._udp_sock: socket.socket | None = None
        self._port = 0
        self._threads: list[threading.Thread] = []
        self._sessions: set[_Session] = set()
        self._tcp_clients: dict[threading.Thread, socket.socket] = {}
        self._udp_peers: dict[tuple, queue.Queue] = {}
        self._next_session = random.randrange(1, 0xFFFF)

    # -- lifecycle -------------------------------------------------------------------

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        return self._port

    def start(self) -> "ZKEmulator":
        """Binds TCP and UDP on one port (port 0: a free one) and starts serving.

        Raises OSError when the port cannot be bound.
        """
        if self._started:
            raise RuntimeError("the emulator is already running")
        self._tcp_sock, self._udp_sock, self._port = self._bind()
        self._started = True
        self._spawn(self._accept_loop, "zk-emu-accept")
        self._spawn(self._udp_loop, "zk-emu-udp")
        if self.live_interval:
            self._spawn(self._live_loop, "zk-emu-live")
        logger.info(
            "listening on %s:%d (tcp+udp): %d users, %d records, %d templates",
            self._host,
            self._port,
            len(self.state.users),
            len(self.state.attendance),
            len(self.state.templates),
        )
        return self

    def stop(self) -> None:
        """Closes every socket and joins every thread (bounded)."""
        if not self._started or self._stopping.is_set():
            return
        self._stopping.set()
        with self._lock:
            clients = list(self._tcp_clients.values())
        for conn in clients:
            # Wakes a thread blocked in sendall to a client that stopped reading.
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                logger.debug("a client connection was already closed")
        deadline = time.monotonic() + JOIN_TIMEOUT
        while time.monotonic() < deadline:
            # Again until none is left: a loop may have started a client thread
            # in the poll interval before it saw the stop.
            with self._lock:
                threads = [t for t in self._threads + list(self._tcp_clients) if t.is_alive()]
            if not threads:
                break
            for thread in threads:
                thread.join(max(0.0, deadline - time.monotonic()))
        # Closed only now: a socket closed under a thread still polling it could
        # have its descriptor number reused by another socket meanwhile.
        self._tcp_sock.close()
        self._udp_sock.close()
        logger.info("stopped")

    def serve_forever(self) -> None:
        """Serves until stop() is called or the process is interrupted (Ctrl-C)."""
        if not self._started:
            self.start()
        try:
            while not self._stopping.wait(0.5):
                pass
        finally:
            self.stop()

    def __enter__(self) -> "ZKEmulator":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _bind(self) -> tuple[socket.socket, socket.socket, int]:
        attempts = 20 if self._requested_port == 0 else 1
        attempt = 0
        while True:
            attempt += 1
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                tcp.bind((self._host, self._requested_port))
                port = tcp.getsockname()[1]
                udp.bind((self._host, port))
            except OSError:
                tcp.close()
                udp.close()
                # Port 0 gave a TCP port whose UDP twin is taken: try another.
                if attempt >= attempts:
                    raise
                continue
            tcp.listen(16)
            tcp.settimeout(POLL_INTERVAL)
            udp.settimeout(POLL_INTERVAL)
            return tcp, udp, port

    def _spawn(self, target, name: str, *args) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        with self._lock:
            # Started under the lock so stop() never sees a thread not yet alive.
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
            thread.start()

    # -- device-wide behaviour -------------------------------------------------------

    def device_now(self) -> datetime:
        """The device clock: naive local wall-clock time plus the offset."""
        return (datetime.now() + timedelta(seconds=self.clock_offset)).replace(microsecond=0)

    def set_device_time(self, when: datetime) -> None:
        self.clock_offset = (when - datetime.now()).total_seconds()

    def unlock_door(self, seconds: float) -> None:
        self._door_unlocked_until = time.monotonic() + seconds

    def door_unlocked(self) -> bool:
        return time.monotonic() < self._door_unlocked_until

    def push_punch(
        self,
        user_id: str,
        timestamp: datetime | None = None,
        *,
        status: int = 1,
        punch: int = 0,
    ) -> AttendanceRecord:
        """Someone punches now: the log gets the record and every client that
        registered for attendance events is sent one live event."""
        record = self.state.add_punch(
            user_id=user_id, timestamp=timestamp or self.device_now(), status=status, punch=punch
        )
        with self._lock:
            sessions = list(self._sessions)
        for session in sessions:
            session.queue_event(record)
        return record

    def record_size(self, tcp: bool) -> int:
        """The attendance record size served over TCP (`tcp`) or UDP."""
        return self._record_size or (40 if tcp else 16)

    def waiting_punches(self) -> int:
        """punch_during_read punches refused while disabled, made at the next enable."""
        with self._lock:
            return len(self._waiting)

    def _set_enabled(self, enabled: bool, command: str) -> None:
        with self._lock:
            self.enabled = enabled
            self.enable_log.append(command)
            waiting, self._waiting = (self._waiting, []) if enabled else ([], self._waiting)
        for user_id in waiting:
            # They punched while the clock was locked and punch again now.
            self._reader_punch(user_id)

    def _someone_punches(self) -> None:
        if not self.punch_during_read:
            return
        with self.state.lock:
            users = list(self.state.users)
        if not users:
            return
        with self._lock:
            user = users[self._next_reader_punch % len(users)]
            self._next_reader_punch += 1
            if not (self.enabled or self.ignore_disable):
                self._waiting.append(user.user_id)
                return
        self._reader_punch(user.user_id)

    def _reader_punch(self, user_id: str) -> None:
        # A second apart at least, so no two of them are the same punch.
        moment = self.device_now()
        with self._lock:
            if self._last_reader_punch is not None and moment <= self._last_reader_punch:
                moment = self._last_reader_punch + timedelta(seconds=1)
            self._last_reader_punch = moment
            self.punches_during_read += 1
        self.push_punch(user_id, moment)

    def event_listeners(self) -> int:
        """How many clients are registered for attendance events right now."""
        with self._lock:
            return sum(1 for s in self._sessions if s.event_flags & EF_ATTLOG)

    def _new_session_id(self) -> int:
        with self._lock:
            self._next_session = self._next_session % 0xFFFF + 1
            return self._next_session

    def _wait_before_reply(self) -> None:
        if self.delay_ms:
            self._stopping.wait(self.delay_ms / 1000)

    def _pause(self, seconds: float) -> None:
        self._stopping.wait(seconds)

    # -- TCP -------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, peer = self._tcp_sock.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                # Out of descriptors, a connection aborted before accept: keep listening.
                logger.warning("accept failed: %s", exc)
                self._stopping.wait(POLL_INTERVAL)
                continue
            with self._lock:
                full = len(self._tcp_clients) >= MAX_TCP_CLIENTS
            if full:
                logger.warning("refused %s:%d: %d clients connected", *peer, MAX_TCP_CLIENTS)
                conn.close()
                continue
            thread = threading.Thread(
                target=self._serve_tcp, args=(conn, peer), name=f"zk-emu-tcp-{peer[1]}", daemon=True
            )
            with self._lock:
                self._tcp_clients[thread] = conn
                thread.start()

    def _serve_tcp(self, conn: socket.socket, peer: tuple) -> None:
        sent = 0

        def send(packet: bytes) -> None:
            nonlocal sent
            frame = TCP_MAGIC + struct.pack("<I", len(packet)) + packet
            limit = self.drop_after_bytes
            if limit is not None and sent + len(frame) > limit:
                conn.sendall(frame[: max(0, limit - sent)])
                sent = max(sent, limit)
                raise _ClientGone
            stall = self.stall_after_bytes
            if stall is not None and sent + len(frame) > stall:
                conn.sendall(frame[: max(0, stall - sent)])
                sent = max(sent, stall)
                raise _Stalled
            conn.sendall(frame)
            sent += len(frame)

        label = f"tcp {peer[0]}:{peer[1]}"
        session = None
        abort = False
        selector = selectors.DefaultSelector()
        try:
            # One frame per sendall with Nagle off: pyzk parses each reply from a
            # single recv(), so a frame split across segments breaks it (§1.6).
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(SEND_TIMEOUT)
            session = _Session(self, peer, tcp=True, send=send, local_ip=conn.getsockname()[0])
            with self._lock:
                self._sessions.add(session)
            frames = _TcpFrames(label)
            selector.register(conn, selectors.EVENT_READ)
            while not self._stopping.is_set() and not session.closing:
                if not selector.select(POLL_INTERVAL):
                    session.flush_event()
                    continue
                data = conn.recv(65536)
                if not data:
                    break
                if self.silent:
                    continue
                for packet in frames.feed(data):
                    session.handle(packet)
                    if session.closing:
                        break
        except _ClientGone:
            logger.info("%s: dropped after %d bytes (drop_after_bytes)", label, sent)
            abort = True
        except _Stalled:
            logger.info("%s: hung after %d bytes (stall_after_bytes)", label, sent)
            # Hold the connection open, answering nothing, until the client
            # gives up and closes it or the emulator stops.
            try:
                while not self._stopping.is_set():
                    if selector.select(POLL_INTERVAL) and not conn.recv(65536):
                        break
            except OSError as exc:
                logger.debug("%s: connection ended: %s", label, exc)
        except OSError as exc:
            logger.debug("%s: connection ended: %s", label, exc)
        finally:
            with self._lock:
                self._sessions.discard(session)
                self._tcp_clients.pop(threading.current_thread(), None)
            selector.close()
            if abort:
                # A reset, not a FIN: after an orderly close pyzk's raw receive
                # loop gets b"" forever and spins instead of failing.
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()

    # -- UDP -------------------------------------------------------------------------

    def _udp_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                data, peer = self._udp_sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                if self._stopping.is_set():
                    break
                continue
            if self.silent:
                continue
            with self._lock:
                inbox = self._udp_peers.get(peer)
                if inbox is None:
                    if len(self._udp_peers) >= MAX_UDP_PEERS:
                        logger.warning("ignored %s:%d: %d UDP peers active", *peer, MAX_UDP_PEERS)
                        continue
                    inbox = self._udp_peers[peer] = queue.Queue(UDP_QUEUE_DEPTH)
                    start_worker = True
                else:
                    start_worker = False
                try:
                    inbox.put_nowait(data)
                except queue.Full:
                    logger.debug("udp %s:%d: dropped a datagram, peer flooding", *peer)
            if start_worker:
                self._spawn(self._serve_udp_peer, f"zk-emu-udp-{peer[1]}", peer, inbox)

    def _serve_udp_peer(self, peer: tuple, inbox: queue.Queue) -> None:
        sock = self._udp_sock
        local_ip = sock.getsockname()[0]

        def send(packet: bytes) -> None:
            sock.sendto(packet, peer)

        def new_session() -> _Session:
            session = _Session(self, peer, tcp=False, send=send, local_ip=local_ip)
            with self._lock:
                self._sessions.add(session)
            return session

        session = new_session()
        idle_since = time.monotonic()
        try:
            while not self._stopping.is_set():
                try:
                    packet = inbox.get(timeout=POLL_INTERVAL)
                except queue.Empty:
                    session.flush_event()
                    if time.monotonic() - idle_since > UDP_PEER_IDLE:
                        with self._lock:
                            # Leave only with an empty inbox, under the lock the
                            # reader uses, so no datagram is lost in between.
                            if inbox.empty():
                                return
                    continue
                idle_since = time.monotonic()
                session.handle(packet)
                if session.closing:
                    # UDP has no connection to close: EXIT or RESTART ends the
                    # session, and the peer must CONNECT again.
                    with self._lock:
                        self._sessions.discard(session)
                    session = new_session()
        except OSError as exc:
            logger.debug("%s: session ended: %s", session.label, exc)
        finally:
            with self._lock:
                self._sessions.discard(session)
                if self._udp_peers.get(peer) is inbox:
                    del self._udp_peers[peer]

    # -- live punches ----------------------------------------------------------------

    def _live_loop(self) -> None:
        rng = random.Random()
        while not self._stopping.wait(self.live_interval):
            # People punch whether or not anyone listens; a disabled clock
            # refuses them, as a real one does.
            if not self.enabled:
                continue
            with self.state.lock:
                users = list(self.state.users)
            if users:
                user = rng.choice(users)
                status, punch = self._next_punch_of(user.user_id)
                self.push_punch(user.user_id, status=status, punch=punch)

    def _next_punch_of(self, user_id: str) -> tuple[int, int]:
        """Same verification as the user's last punch; out if they are in today."""
        today = self.device_now().date()
        with self.state.lock:
            last = next((r for r in reversed(self.state.attendance) if r.user_id == user_id), None)
        if last is None:
            return 1, 0
        inside = last.timestamp.date() == today and last.punch in (0, 3)
        return last.status, 1 if inside else 0
