"""One client's conversation with the clock: the handler of every command pyzk
sends, over TCP or UDP."""

import logging
import struct
import time
from collections import deque
from typing import TYPE_CHECKING

from core.zk.emulator.state import AttendanceRecord
from core.zk.emulator.wire import (
    _COMMAND_NAMES,
    _EVENT12,
    _EVENT52,
    CMD_ACK_ERROR,
    CMD_ACK_OK,
    CMD_ACK_UNAUTH,
    CMD_ACK_UNKNOWN,
    CMD_ATTLOG_RRQ,
    CMD_AUTH,
    CMD_CANCELCAPTURE,
    CMD_CLEAR_ATTLOG,
    CMD_CLEAR_DATA,
    CMD_CLEAR_LCD,
    CMD_CONNECT,
    CMD_DATA,
    CMD_DB_RRQ,
    CMD_DEL_USER_TEMP,
    CMD_DELETE_USER,
    CMD_DELETE_USERTEMP,
    CMD_DISABLEDEVICE,
    CMD_DOORSTATE_RRQ,
    CMD_ENABLE_CLOCK,
    CMD_ENABLEDEVICE,
    CMD_EXIT,
    CMD_FREE_DATA,
    CMD_GET_FREE_SIZES,
    CMD_GET_PINWIDTH,
    CMD_GET_TIME,
    CMD_GET_USERTEMP,
    CMD_GET_VERSION,
    CMD_OPTIONS_RRQ,
    CMD_OPTIONS_WRQ,
    CMD_POWEROFF,
    CMD_PREPARE_BUFFER,
    CMD_PREPARE_DATA,
    CMD_READ_BUFFER,
    CMD_REFRESHDATA,
    CMD_REFRESHOPTION,
    CMD_REG_EVENT,
    CMD_RESTART,
    CMD_SAVE_USERTEMPS,
    CMD_SET_TIME,
    CMD_STARTVERIFY,
    CMD_TESTVOICE,
    CMD_UNLOCK,
    CMD_USER_WRQ,
    CMD_USERTEMP_RRQ,
    CMD_WRITE_LCD,
    EF_ATTLOG,
    FCT_ATTLOG,
    FCT_FINGERTMP,
    FCT_USER,
    HEADER,
    _attendance_blob,
    _cstr,
    _fit,
    _numeric_id,
    _parse_upload,
    _templates_blob,
    _timehex,
    _user_from_wire,
    _users_blob,
    build_packet,
    checksum_ok,
    make_commkey,
)
from core.zk.protocol import USER_28, decode_time, encode_time

if TYPE_CHECKING:
    from core.zk.emulator.server import ZKEmulator

logger = logging.getLogger(__name__)


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

MAX_UPLOAD = 16 * 1024 * 1024


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
