"""Reads ZKTeco devices: pyzk speaks the protocol, we decode the bulk buffers.

pyzk handles the wire (connect, comm key, read_sizes, read_with_buffer), but
its own get_attendance() slices the buffer record by record (quadratic in the
log size) and looks each record's user up in a list. We ask pyzk for the raw
buffer once and decode it with struct.iter_unpack instead.

Every pyzk and socket failure leaves this module as one of the DeviceError
subclasses below, with a message that tells an operator what to check.
"""

from __future__ import annotations

import datetime
import logging
import socket
import struct
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import NamedTuple

from zk import ZK
from zk import const as zk_const
from zk.base import ZK_helper
from zk.exception import ZKError, ZKErrorResponse, ZKNetworkError

from core.zk.protocol import USER_28, USER_72, split_time

logger = logging.getLogger(__name__)

# --- Errors ------------------------------------------------------------------------


class DeviceError(Exception):
    """A device could not be read. The message says what to check."""


class DeviceUnreachable(DeviceError):
    pass


class DeviceAuthError(DeviceError):
    pass


class DeviceProtocolError(DeviceError):
    pass


class DeviceTimeout(DeviceError):
    pass


# --- Decoded data --------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceSizes:
    users: int
    users_capacity: int
    records: int
    records_capacity: int
    fingers: int
    fingers_capacity: int


@dataclass(frozen=True)
class DeviceUser:
    uid: int
    user_id: str
    name: str
    privilege: int
    password: str
    card: int
    group_id: str
    # Why the name's bytes do not read as the device's encoding ("" when they do):
    # the name is kept, with replacement characters, and the poll warns.
    name_problem: str = ""


class Punch(NamedTuple):
    """One attendance record as the device stores it.

    `timestamp` is the device's naive local wall-clock time. `problem` says why
    the record cannot be taken at face value, or is None:
    - the device's time encoding gives every month 31 days, so a record can name
      a date that does not exist (a corrupt or badly set clock); `timestamp` then
      holds the same number of days counted from the 1st of the month, which
      keeps the record storable and unique;
    - an 8-byte record names only the device-internal uid; when no user on the
      device has it, `user_id` is `uid:<n>`, which no employee's user id can be.
    """

    user_id: str
    timestamp: datetime.datetime
    status: int
    punch: int
    problem: str | None = None


@dataclass(frozen=True)
class DeviceLog:
    """What one read of a device's log brought back (DeviceClient.read_log).

    `sizes` carries the user and record counts the buffers proved, which can be
    higher than the counts read first when the device kept recording meanwhile.
    `warnings` are for the operator: the read succeeded, but something needs
    their attention (user names not valid in the device's encoding).
    """

    sizes: DeviceSizes
    users: list[DeviceUser]
    punches: list[Punch]
    warnings: list[str] = field(default_factory=list)


# --- Time decoding -------------------------------------------------------------------


def decode_device_time(value: int) -> tuple[datetime.datetime, str | None]:
    """Decodes a record's u32 time: (naive local datetime, problem or None).

    Never raises: a date that does not exist (the format allows 31 February)
    comes back counted from the 1st of its month, with the problem named.
    """
    year, month, day, hour, minute, second = split_time(value)
    try:
        return datetime.datetime(year, month, day, hour, minute, second), None
    except ValueError:
        start = datetime.datetime(year, month, 1, hour, minute, second)
        return (
            start + datetime.timedelta(days=day - 1),
            f"device date {year:04d}-{month:02d}-{day:02d} does not exist",
        )


# --- Buffer decoders -----------------------------------------------------------------
# Record layouts from ../shared/ZK_PROTOCOL.md §4. Each buffer starts with a u32
# holding the total size of the records that follow.

ATTENDANCE_40 = struct.Struct("<H24sBIB8x")  # uid, user_id, status, time, punch
ATTENDANCE_16 = struct.Struct("<IIBB6x")  # user_id (numeric), time, status, punch
# The 8-byte ZEM500/MA300 layout. pyzk reads time at offset 3, but captures from
# real devices (pyzk issues #56, #92, #99) put it at offset 4 after the status
# and punch bytes; reading it at 3 gives the far-future dates those issues show.
ATTENDANCE_8 = struct.Struct("<HBBI")  # uid, status, punch, time


# Record sizes the bridge knows how to read. Longer attendance records are
# newer firmware's: 49 bytes on SpeedFace devices (pyzk PR #166), whose first 40
# bytes follow the 40-byte layout. A size is trusted only when the buffer holds
# a whole number of records of one of these sizes for a count the device gave.
ATTENDANCE_SIZES = (8, 16, 40, 49)
USER_SIZES = (28, 72)


def _text(raw: bytes, encoding: str) -> str:
    return raw.split(b"\x00", 1)[0].decode(encoding, errors="replace").strip()


def _name(raw: bytes, encoding: str) -> tuple[str, str]:
    """A user name in the device's encoding: (text, problem or "")."""
    raw = raw.split(b"\x00", 1)[0]
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as exc:
        # Clocks cut names to the field byte-wise: a character cut in two at the
        # very end is the field's limit, not a wrong encoding.
        cut = exc.reason in ("unexpected end of data", "incomplete multibyte sequence")
        if not cut or exc.end != len(raw) or exc.start == 0:
            return raw.decode(encoding, errors="replace").strip(), f"not valid {encoding}"
        try:
            text = raw[: exc.start].decode(encoding)
        except UnicodeDecodeError:
            return raw.decode(encoding, errors="replace").strip(), f"not valid {encoding}"
    if encoding != "utf-8" and not raw.isascii():
        # A single-byte code page reads any bytes: UTF-8 names would come out
        # garbled without an error. Real names in those code pages are almost
        # never valid UTF-8 as well.
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            pass
        else:
            return text.strip(), "valid UTF-8"
    return text.strip(), ""


def name_warnings(users: Iterable[DeviceUser], *, encoding: str) -> list[str]:
    """The operator's warnings about names that did not read as `encoding`."""
    invalid = [u for u in users if u.name_problem.startswith("not valid")]
    utf8 = [u for u in users if u.name_problem == "valid UTF-8"]
    warnings = []
    if invalid:
        example = invalid[0]
        warnings.append(
            f"{len(invalid)} user name(s) are not valid {encoding} and were stored with "
            f"replacement characters (user {example.user_id}: {example.name!r}): set the "
            "device's Encoding to the code page the clock writes names in (for example "
            "cp1251 for Cyrillic, cp1250 for Central European, cp1252 for Western European)"
        )
    if utf8:
        example = utf8[0]
        warnings.append(
            f"{len(utf8)} user name(s) read as {encoding} look like UTF-8 (user "
            f"{example.user_id}: {example.name!r}): set the device's Encoding to UTF-8 if "
            "the names look garbled"
        )
    return warnings


def _body(buffer: bytes, what: str) -> memoryview:
    """The record area of a bulk buffer (after its u32 total), checked complete."""
    if len(buffer) < 4:
        raise DeviceProtocolError(f"the device sent a {what} buffer of {len(buffer)} bytes")
    (total,) = struct.unpack_from("<I", buffer)
    body = memoryview(buffer)[4 : 4 + total]
    if len(body) != total:
        raise DeviceProtocolError(
            f"the device announced {total} bytes of {what} but sent {len(body)}; "
            "the transfer was cut short, try again"
        )
    return body


def _records(buffer: bytes, count: int, what: str) -> tuple[memoryview, int]:
    """Splits a bulk buffer into its record area and the size of one record."""
    body = _body(buffer, what)
    if count <= 0 or len(body) % count:
        raise DeviceProtocolError(
            f"the device reports {count} {what} but sent {len(body)} bytes, which is not a "
            "whole number of records; its firmware may use a layout this bridge does not know"
        )
    return body, len(body) // count


def record_counts(total: int, *, low: int, high: int, sizes: Iterable[int]) -> list[int]:
    """The record counts from `low` to `high` at which `total` bytes are whole
    records of one of the known `sizes`, one per size that fits."""
    if total == 0:
        return [0] if low == 0 else []
    return [total // size for size in sizes if total % size == 0 and low <= total // size <= high]


def proven_count(
    buffer: bytes, *, before: int, read_after: Callable[[], int], sizes: Iterable[int], what: str
) -> int:
    """The number of records in a bulk buffer, proven by a count the device gave.

    `before` (the count read before the buffer) proves it when the buffer is a
    whole number of records of one of the known `sizes` at that count.
    Otherwise the device recorded meanwhile: `read_after()` reads the count
    again, and the buffer must be whole records of exactly one known size for a
    count between the two (a log only grows while it is read). Anything else is
    a DeviceProtocolError naming the bytes, the counts and the sizes tried.
    """
    if not buffer:
        return 0
    sizes = tuple(sizes)
    total = len(_body(buffer, what))
    counts = record_counts(total, low=before, high=before, sizes=sizes)
    if counts:
        return counts[0]
    after = read_after()
    # A count that went down means the log was cleared meanwhile: then only the
    # new count itself can prove the buffer.
    counts = record_counts(total, low=before if before <= after else after, high=after, sizes=sizes)
    if len(counts) == 1:
        return counts[0]
    seen = str(before) if before == after else f"{before} before the read and {after} after"
    if counts:
        fits = "it fits " + " and ".join(f"{c} records of {total // c} bytes" for c in counts)
    else:
        fits = "it fits none"
    raise DeviceProtocolError(
        f"the device sent {total} bytes of {what} while reporting {seen}; at the record sizes "
        f"this bridge knows ({', '.join(map(str, sizes))} bytes) {fits}, so nothing was "
        "stored. It may have recorded during the read (poll again), or its firmware uses a "
        "layout this bridge does not know"
    )


def decode_users(buffer: bytes, count: int, *, encoding: str = "utf-8") -> list[DeviceUser]:
    """Decodes a user table buffer (28-byte ZK6 or 72-byte ZK8 records).

    Names are read strictly in `encoding`; one that is not valid in it keeps
    replacement characters and says so in `name_problem` (see name_warnings).
    """
    if count == 0:
        return []
    body, size = _records(buffer, count, "users")
    users = []
    if size == 28:
        for uid, privilege, password, name, card, group_id, _tz, user_id in USER_28.iter_unpack(
            body
        ):
            text, problem = _name(name, encoding)
            users.append(
                DeviceUser(
                    uid=uid,
                    user_id=str(user_id),
                    name=text,
                    privilege=privilege,
                    password=_text(password, encoding),
                    card=card,
                    group_id=str(group_id),
                    name_problem=problem,
                )
            )
    elif size == 72:
        for uid, privilege, password, name, card, group_id, user_id in USER_72.iter_unpack(body):
            text, problem = _name(name, encoding)
            users.append(
                DeviceUser(
                    uid=uid,
                    user_id=_text(user_id, encoding),
                    name=text,
                    privilege=privilege,
                    password=_text(password, encoding),
                    card=card,
                    group_id=_text(group_id, encoding),
                    name_problem=problem,
                )
            )
    else:
        raise DeviceProtocolError(f"unknown user record size {size} bytes (expected 28 or 72)")
    return users


def decode_attendance(
    buffer: bytes,
    count: int,
    *,
    user_ids_by_uid: dict[int, str] | None = None,
    encoding: str = "utf-8",
) -> list[Punch]:
    """Decodes an attendance log buffer into Punch tuples, in device order.

    Handles 8-, 16-, 40- and 49-byte records (ATTENDANCE_SIZES); any other
    size is a DeviceProtocolError. 8-byte records carry only the device-internal
    uid; `user_ids_by_uid` maps it to the user id shown on the device, and a uid
    it does not hold becomes the user id `uid:<n>` with a problem saying so.
    """
    if count == 0:
        return []
    body, size = _records(buffer, count, "attendance records")
    if size not in ATTENDANCE_SIZES:
        raise DeviceProtocolError(
            f"unknown attendance record size {size} bytes (expected "
            f"{', '.join(map(str, ATTENDANCE_SIZES))}): {count} records in {len(body)} bytes"
        )

    # A log holds a few hundred user ids and a few hundred days, so each user id
    # and each day is decoded once; a time is its day's midnight plus seconds.
    days: dict[int, tuple[datetime.datetime, str | None]] = {}
    names: dict[bytes, str] = {}
    second = datetime.timedelta(seconds=1)

    def when(value: int) -> tuple[datetime.datetime, str | None]:
        day, seconds = divmod(value, 86400)
        midnight = days.get(day)
        if midnight is None:
            midnight = days[day] = decode_device_time(day * 86400)
        return midnight[0] + seconds * second, midnight[1]

    punches: list[Punch] = []
    append = punches.append
    if size >= 40:
        if size == 40:
            rows = ATTENDANCE_40.iter_unpack(body)
        else:
            rows = (ATTENDANCE_40.unpack_from(body, offset) for offset in range(0, len(body), size))
        for _uid, raw_user, status, value, punch in rows:
            user_id = names.get(raw_user)
            if user_id is None:
                user_id = names[raw_user] = _text(raw_user, encoding)
            moment, problem = when(value)
            append(Punch(user_id, moment, status, punch, problem))
    elif size == 16:
        for number, value, status, punch in ATTENDANCE_16.iter_unpack(body):
            moment, problem = when(value)
            append(Punch(str(number), moment, status, punch, problem))
    else:
        mapping = user_ids_by_uid or {}
        for uid, status, punch, value in ATTENDANCE_8.iter_unpack(body):
            moment, problem = when(value)
            user_id = mapping.get(uid)
            if user_id is None:
                # Never the bare number: it would credit the punch to whoever has
                # that user id, a different person from the uid's owner.
                user_id = f"uid:{uid}"
                unknown = f"uid {uid} matches no user on the device"
                problem = f"{problem}; {unknown}" if problem else unknown
            append(Punch(user_id, moment, status, punch, problem))
    return punches


# --- The client ----------------------------------------------------------------------


class _NoProbe(ZK_helper):
    def test_tcp(self):
        # pyzk opens and drops a probe connection (with its own fixed 10 s
        # timeout) before the real one; _ZK's connect reports failures itself.
        return 0


class _ZK(ZK):
    """pyzk with its connection failures made visible, and one hang fixed.

    - pyzk connects with connect_ex() and ignores the result, so a refused or
      unanswered connection surfaces later as "Broken pipe"; here connect()
      raises what actually happened, within the device's timeout.
    - pyzk's raw-data loop keeps calling recv() while bytes are missing; after
      the peer closes, recv() returns b"" forever and the loop never ends.
    """

    def __init__(self, *args, on_bytes: Callable[[int], None] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.helper = _NoProbe(*self._ZK__address)
        # Told the size of each chunk of a bulk read as it arrives (progress).
        self.on_bytes = on_bytes

    def _ZK__read_chunk(self, start, size):  # overrides pyzk's name-mangled method
        data = ZK._ZK__read_chunk(self, start, size)
        if self.on_bytes is not None:
            self.on_bytes(len(data))
        return data

    def _ZK__create_socket(self):  # overrides pyzk's name-mangled method
        if self.tcp:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.settimeout(self._ZK__timeout)
            self._ZK__sock = sock
            sock.connect(self._ZK__address)
        else:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.settimeout(self._ZK__timeout)
            self._ZK__sock = sock

    def _ZK__recieve_raw_data(self, size):  # overrides pyzk's name-mangled method
        chunks = []
        sock = self._ZK__sock
        while size > 0:
            chunk = sock.recv(size)
            if not chunk:
                raise ConnectionResetError("the device closed the connection mid-transfer")
            chunks.append(chunk)
            size -= len(chunk)
        return b"".join(chunks)


class DeviceClient:
    """A connection to one device. Use as a context manager.

        with DeviceClient(host="10.0.0.5", port=4370, protocol="tcp") as client:
            log = client.read_log()  # log.users, log.punches

    Raises DeviceError subclasses only.
    """

    def __init__(
        self,
        *,
        host: str,
        port: int = 4370,
        protocol: str = "tcp",
        comm_key: int = 0,
        timeout: float = 30,
        encoding: str = "utf-8",
        on_bytes: Callable[[int], None] | None = None,
    ) -> None:
        if protocol not in ("tcp", "udp"):
            raise ValueError(f"protocol must be 'tcp' or 'udp', not {protocol!r}")
        self.host = host
        self.port = port
        self.protocol = protocol
        self.comm_key = comm_key
        self.timeout = timeout
        self.encoding = encoding
        # Called with the size of each chunk of a bulk read (a progress display).
        self.on_bytes = on_bytes
        self._zk: _ZK | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port} ({self.protocol.upper()})"

    # -- connection --

    def connect(self) -> None:
        zk = _ZK(
            self.host,
            port=self.port,
            timeout=self.timeout,
            password=self.comm_key,
            force_udp=self.protocol == "udp",
            # pyzk's ping check shells out to `ping`, which containers often
            # lack (pyzk #122); a failed connect says the same more precisely.
            ommit_ping=True,
            encoding=self.encoding,
            on_bytes=self.on_bytes,
        )
        try:
            with self._errors("connecting"):
                zk.connect()
        except DeviceError:
            self._close_socket(zk)
            raise
        self._zk = zk

    def close(self) -> None:
        zk, self._zk = self._zk, None
        if zk is None:
            return
        try:
            zk.disconnect()
        except (ZKError, OSError, struct.error):
            pass  # the session is over either way; the socket is closed below
        self._close_socket(zk)

    def __enter__(self) -> DeviceClient:
        self.connect()
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- reads and writes --

    def read_sizes(self) -> DeviceSizes:
        zk = self._connected()
        with self._errors("reading the record counts"):
            zk.read_sizes()
        return DeviceSizes(
            users=zk.users,
            users_capacity=zk.users_cap,
            records=zk.records,
            records_capacity=zk.rec_cap,
            fingers=zk.fingers,
            fingers_capacity=zk.fingers_cap,
        )

    def read_identity(self) -> dict[str, str]:
        """Serial number, firmware, platform and device name."""
        zk = self._connected()
        with self._errors("reading the device identity"):
            return {
                "serial_number": zk.get_serialnumber() or "",
                "firmware": zk.get_firmware_version() or "",
                "platform": zk.get_platform() or "",
                "device_name": zk.get_device_name() or "",
            }

    def get_time(self) -> datetime.datetime:
        """The device clock, naive local wall-clock time."""
        zk = self._connected()
        with self._errors("reading the clock"):
            return zk.get_time()

    def set_time(self, moment: datetime.datetime) -> None:
        """Sets the device clock to a naive local wall-clock time."""
        if moment.tzinfo is not None:
            raise ValueError("device clocks take naive local times; convert to the device zone")
        zk = self._connected()
        with self._errors("setting the clock"):
            zk.set_time(moment)

    # -- the users on the device --

    def read_users(self) -> list[DeviceUser]:
        """The users on the device, read live (without disabling it: users are
        not added while someone punches, and the count proves the buffer)."""
        sizes = self.read_sizes()
        if not sizes.users:
            return []
        buffer = self._bulk(zk_const.CMD_USERTEMP_RRQ, zk_const.FCT_USER, "downloading the users")
        count = proven_count(
            buffer,
            before=sizes.users,
            read_after=lambda: self.read_sizes().users,
            sizes=USER_SIZES,
            what="users",
        )
        return decode_users(buffer, count, encoding=self.encoding)

    def read_pin_width(self) -> int:
        """How many characters a user id (PIN) may have on this device."""
        zk = self._connected()
        with self._errors("reading the PIN width"):
            return int(zk.get_pin_width())

    @property
    def user_record_size(self) -> int:
        """72 (ZK8, TCP: user ids are text) or 28 (ZK6, UDP: user ids are numbers,
        names at most 8 bytes): the layout the device takes users in."""
        return self._connected().user_packet_size

    def write_user(self, user: DeviceUser) -> None:
        """Adds the user, or replaces the one with the same uid (CMD_USER_WRQ).

        The caller checks the fields fit the record (core.device_users): pyzk
        drops what does not encode and cuts what is too long, silently.
        """
        zk = self._connected()
        with self._errors(f"writing user {user.user_id}"):
            zk.set_user(
                uid=user.uid,
                name=user.name,
                privilege=user.privilege,
                password=user.password,
                group_id=user.group_id,
                user_id=user.user_id,
                card=user.card,
            )

    def delete_user(self, uid: int) -> None:
        """Deletes the user with this device-internal uid, with its fingerprints."""
        zk = self._connected()
        with self._errors(f"deleting the user with uid {uid}"):
            zk.delete_user(uid=uid)

    def read_log(self) -> DeviceLog:
        """Reads the user list and the whole attendance log, the way clocks are
        meant to be read: disabled for the read, enabled again whatever happens.

        A disabled clock takes no punches, so its counts and its log agree; on
        firmware that keeps recording anyway, the buffers are decoded only at a
        record size that a count read in this session proves (proven_count).
        If the read fails, the device is enabled on this connection when it is
        still in step, else on a fresh one (bounded by the timeout); a device
        that cannot be enabled again is logged and named in the error.

        Raises DeviceError subclasses; nothing is returned from a failed read.
        """
        zk = self._connected()
        try:
            with self._errors("disabling the device for the read"):
                zk.disable_device()
            log = self._read_disabled()
        except BaseException as exc:
            problem = self._enable_after(exc)
            if problem and isinstance(exc, DeviceError):
                raise type(exc)(f"{exc}. Also, {problem}") from exc
            raise
        problem = self._enable_after(None)
        if problem:
            raise DeviceError(f"the log of {self.address} was read, but {problem}")
        return log

    def clear_log_if(self, check: Callable[[DeviceLog], str]) -> tuple[DeviceLog, str]:
        """Reads the log as read_log does and clears it only if `check` allows.

        The device stays disabled from the read to the clear, so nobody punches
        in between (a disabled clock takes no punch; the person punches again
        once it is enabled). `check` gets the log and returns "" to clear it,
        else why not. Before clearing, the record count is read again: firmware
        that records while disabled and took a punch during the check keeps its
        log. Returns the log and "" when it was cleared, else the reason.

        Raises DeviceError subclasses; the device is enabled again whatever happens.
        """
        zk = self._connected()
        try:
            with self._errors("disabling the device for the read"):
                zk.disable_device()
            log = self._read_disabled()
            reason = check(log)
            if not reason:
                now = self.read_sizes().records
                if now != log.sizes.records:
                    reason = (
                        f"the device recorded {now - log.sizes.records} punches while it was "
                        "being checked (it records while disabled); the log is kept"
                    )
                else:
                    with self._errors("clearing the attendance log"):
                        zk.clear_attendance()
        except BaseException as exc:
            problem = self._enable_after(exc)
            if problem and isinstance(exc, DeviceError):
                raise type(exc)(f"{exc}. Also, {problem}") from exc
            raise
        problem = self._enable_after(None)
        if problem:
            done = "cleared" if not reason else "read"
            raise DeviceError(f"the log of {self.address} was {done}, but {problem}")
        return log, reason

    def _read_disabled(self) -> DeviceLog:
        first = self.read_sizes()
        users_buffer = attendance_buffer = b""
        if first.users:
            users_buffer = self._bulk(
                zk_const.CMD_USERTEMP_RRQ, zk_const.FCT_USER, "downloading the user list"
            )
        if first.records:
            # fct 0, not FCT_ATTLOG: that is what devices and every client send.
            attendance_buffer = self._bulk(
                zk_const.CMD_ATTLOG_RRQ, 0, "downloading the attendance log"
            )
        later: list[DeviceSizes] = []

        def counts_after() -> DeviceSizes:
            # Read at most once, and only when a buffer does not fit the first counts.
            if not later:
                later.append(self.read_sizes())
            return later[0]

        user_count = proven_count(
            users_buffer,
            before=first.users,
            read_after=lambda: counts_after().users,
            sizes=USER_SIZES,
            what="users",
        )
        record_count = proven_count(
            attendance_buffer,
            before=first.records,
            read_after=lambda: counts_after().records,
            sizes=ATTENDANCE_SIZES,
            what="attendance records",
        )
        users = decode_users(users_buffer, user_count, encoding=self.encoding)
        punches = decode_attendance(
            attendance_buffer,
            record_count,
            user_ids_by_uid={user.uid: user.user_id for user in users},
            encoding=self.encoding,
        )
        return DeviceLog(
            sizes=replace(first, users=user_count, records=record_count),
            users=users,
            punches=punches,
            warnings=name_warnings(users, encoding=self.encoding),
        )

    def _bulk(self, command: int, fct: int, action: str) -> bytes:
        zk = self._connected()
        with self._errors(action):
            buffer, _ = zk.read_with_buffer(command, fct)
        return buffer

    def _enable_after(self, failure: BaseException | None) -> str:
        """Enables the device after a read; "" when done, else what went wrong."""
        zk = self._zk
        in_step = failure is None or (
            isinstance(failure, DeviceError)
            and (failure.__cause__ is None or isinstance(failure.__cause__, ZKErrorResponse))
        )
        if zk is not None and in_step:
            try:
                with self._errors("enabling the device again"):
                    zk.enable_device()
                return ""
            except DeviceError as exc:
                logger.warning("Could not enable %s on the same connection: %s", self.address, exc)
        # The connection was cut, hung or is out of step (a reply may still be
        # on its way): a fresh one, only to enable the device.
        if zk is not None:
            self._close_socket(zk)
            self._zk = None
        try:
            self.connect()
            with self._errors("enabling the device again"):
                self._connected().enable_device()
            return ""
        except DeviceError as exc:
            logger.error("Device %s may be left disabled: %s", self.address, exc)
            return (
                f"the device could not be enabled again ({exc}): it takes no punches "
                "until it is; poll it again or restart it"
            )

    # -- internals --

    def _connected(self) -> _ZK:
        if self._zk is None:
            raise DeviceError(f"not connected to {self.address}; call connect() first")
        return self._zk

    @staticmethod
    def _close_socket(zk: ZK) -> None:
        sock = getattr(zk, "_ZK__sock", None)
        if sock is not None:
            sock.close()

    @contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        """Turns pyzk and socket failures into DeviceError subclasses."""
        where = self.address
        try:
            yield
        except DeviceError:
            raise
        except ZKErrorResponse as exc:
            if "Unauthenticated" in str(exc):
                raise DeviceAuthError(
                    f"{where} rejected the comm key while {action}: set the device's "
                    "comm key (COMM Key in its communication menu; 0 when none is set)"
                ) from exc
            raise DeviceProtocolError(
                f"{where} refused a request while {action} ({exc}); the device may be busy "
                "or its firmware may not support this"
            ) from exc
        except TimeoutError as exc:  # socket.timeout is an alias
            raise self._timeout(action) from exc
        except ZKNetworkError as exc:
            if "timed out" in str(exc):
                raise self._timeout(action) from exc
            if "unpack" in str(exc) or "TCP packet invalid" in str(exc):
                raise DeviceProtocolError(
                    f"{where} sent a reply this bridge cannot read while {action} ({exc}); "
                    "check that the port belongs to a ZKTeco device and the protocol (TCP/UDP) "
                    "is right"
                ) from exc
            raise DeviceUnreachable(
                f"cannot talk to {where} while {action} ({exc}): check the IP address, the "
                "port, the protocol and that the device is powered and on the network"
            ) from exc
        except ConnectionRefusedError as exc:
            raise DeviceUnreachable(
                f"{where} refused the connection while {action}: nothing listens on that "
                "port. Check the IP address, the port (4370 by default) and the protocol"
            ) from exc
        except ConnectionError as exc:
            raise DeviceUnreachable(
                f"the connection to {where} was lost while {action} ({exc}); nothing from "
                "this transfer was stored, the next poll tries again"
            ) from exc
        except (struct.error, ValueError, IndexError) as exc:
            raise DeviceProtocolError(
                f"{where} sent a malformed reply while {action} ({exc})"
            ) from exc
        except OSError as exc:
            raise DeviceUnreachable(
                f"network error talking to {where} while {action} ({exc}): check the "
                "address and that the device is on the network"
            ) from exc

    def _timeout(self, action: str) -> DeviceTimeout:
        return DeviceTimeout(
            f"{self.address} did not answer within {self.timeout:g} s while {action}: check "
            "that the device is on and not busy, the protocol (TCP/UDP) is right, or raise "
            "its timeout"
        )
