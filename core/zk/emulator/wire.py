"""The binary wire format of port 4370: command codes, packets, checksums and
the record layouts users, attendance and templates travel in (ZK_PROTOCOL.md §2-§4).

The reader shares the time encoding and user layouts through core/zk/protocol.py.
"""

import array
import logging
import struct
import sys
from datetime import datetime

from core.zk.emulator.state import (
    AttendanceRecord,
    FingerTemplate,
    UserRecord,
)
from core.zk.protocol import USER_28, USER_72, encode_time

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

# Clients send at most ~1 KiB per packet; anything claiming more is garbage.
MAX_INBOUND_PACKET = 64 * 1024


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
