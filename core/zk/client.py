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
import socket
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

from zk import ZK
from zk import const as zk_const
from zk.base import ZK_helper
from zk.exception import ZKError, ZKErrorResponse, ZKNetworkError

from core.zk.protocol import USER_28, USER_72, split_time

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


class Punch(NamedTuple):
    """One attendance record as the device stores it.

    `timestamp` is the device's naive local wall-clock time. The device's time
    encoding gives every month 31 days, so a record can name a date that does
    not exist (a corrupt or badly set clock): `bad_date` then says so and
    `timestamp` holds the same number of days counted from the 1st of the month,
    which keeps the record storable and unique.
    """

    user_id: str
    timestamp: datetime.datetime
    status: int
    punch: int
    bad_date: str | None = None


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


def _text(raw: bytes, encoding: str) -> str:
    return raw.split(b"\x00", 1)[0].decode(encoding, errors="replace").strip()


def _records(buffer: bytes, count: int, what: str) -> tuple[memoryview, int]:
    """Splits a bulk buffer into its record area and the size of one record."""
    if len(buffer) < 4:
        raise DeviceProtocolError(f"the device sent a {what} buffer of {len(buffer)} bytes")
    (total,) = struct.unpack_from("<I", buffer)
    body = memoryview(buffer)[4 : 4 + total]
    if len(body) != total:
        raise DeviceProtocolError(
            f"the device announced {total} bytes of {what} but sent {len(body)}; "
            "the transfer was cut short, try again"
        )
    if count <= 0 or total % count:
        raise DeviceProtocolError(
            f"the device reports {count} {what} but sent {total} bytes, which is not a whole "
            "number of records; its firmware may use a layout this bridge does not know"
        )
    return body, total // count


def decode_users(buffer: bytes, count: int, *, encoding: str = "utf-8") -> list[DeviceUser]:
    """Decodes a user table buffer (28-byte ZK6 or 72-byte ZK8 records)."""
    if count == 0:
        return []
    body, size = _records(buffer, count, "users")
    users = []
    if size == 28:
        for uid, privilege, password, name, card, group_id, _tz, user_id in USER_28.iter_unpack(
            body
        ):
            users.append(
                DeviceUser(
                    uid=uid,
                    user_id=str(user_id),
                    name=_text(name, encoding),
                    privilege=privilege,
                    password=_text(password, encoding),
                    card=card,
                    group_id=str(group_id),
                )
            )
    elif size == 72:
        for uid, privilege, password, name, card, group_id, user_id in USER_72.iter_unpack(body):
            users.append(
                DeviceUser(
                    uid=uid,
                    user_id=_text(user_id, encoding),
                    name=_text(name, encoding),
                    privilege=privilege,
                    password=_text(password, encoding),
                    card=card,
                    group_id=_text(group_id, encoding),
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

    Handles 8-, 16- and 40-byte records and the longer records of newer
    firmware (for example 49 bytes on SpeedFace devices), whose first 40 bytes
    follow the 40-byte layout. 8-byte records carry only the device-internal
    uid; `user_ids_by_uid` maps it to the user id shown on the device.
    """
    if count == 0:
        return []
    body, size = _records(buffer, count, "attendance records")

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
    elif size == 8:
        mapping = user_ids_by_uid or {}
        for uid, status, punch, value in ATTENDANCE_8.iter_unpack(body):
            moment, problem = when(value)
            append(Punch(mapping.get(uid, str(uid)), moment, status, punch, problem))
    else:
        raise DeviceProtocolError(
            f"unknown attendance record size {size} bytes (expected 8, 16, 40 or more)"
        )
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

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.helper = _NoProbe(*self._ZK__address)

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
            sizes = client.read_sizes()
            punches = client.read_attendance(sizes=sizes)

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
    ) -> None:
        if protocol not in ("tcp", "udp"):
            raise ValueError(f"protocol must be 'tcp' or 'udp', not {protocol!r}")
        self.host = host
        self.port = port
        self.protocol = protocol
        self.comm_key = comm_key
        self.timeout = timeout
        self.encoding = encoding
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

    def read_users(self, *, sizes: DeviceSizes | None = None) -> list[DeviceUser]:
        zk = self._connected()
        sizes = sizes or self.read_sizes()
        if sizes.users == 0:
            return []
        with self._errors("downloading the user list"):
            buffer, _ = zk.read_with_buffer(zk_const.CMD_USERTEMP_RRQ, zk_const.FCT_USER)
        return decode_users(buffer, sizes.users, encoding=self.encoding)

    def read_attendance(
        self, *, sizes: DeviceSizes | None = None, users: list[DeviceUser] | None = None
    ) -> list[Punch]:
        """Downloads and decodes the whole attendance log (devices cannot filter it)."""
        zk = self._connected()
        sizes = sizes or self.read_sizes()
        if sizes.records == 0:
            return []
        with self._errors("downloading the attendance log"):
            # fct 0, not FCT_ATTLOG: that is what devices and every client send.
            buffer, _ = zk.read_with_buffer(zk_const.CMD_ATTLOG_RRQ, 0)
        by_uid = {user.uid: user.user_id for user in users} if users else None
        return decode_attendance(
            buffer, sizes.records, user_ids_by_uid=by_uid, encoding=self.encoding
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
