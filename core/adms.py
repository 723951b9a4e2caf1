"""Clocks that push: the ZKTeco PUSH protocol ("ADMS", "Cloud server", /iclock/).

A clock set to a Cloud server address is an HTTP client: it shakes hands
(GET cdata), uploads its records (POST cdata), polls for commands and reports
its counts (GET getrequest), and posts the commands' results (POST devicecmd).
The views (core.views_adms) parse the request and call one function here; this
module decides what is stored and what the clock is told.

What the clock does with each answer decides the rules here:
- an upload answered 200 with `OK` in the body moves the clock's cursor past
  the batch, so `OK` is said only once the rows are committed; any other
  answer (and no error answer contains `OK`) keeps the batch on the clock,
  which sends it again later;
- batches and command results can come twice: punches keep their unique key
  (device, user ID, time), rejected lines and results are recorded once.

Record times are the clock's local wall-clock time: they become UTC with the
device's zone by the same rule as polled punches (core.ingest), and are
stored through the same bulk path, so a punch both polled and pushed is one.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from core.ingest import _rows, employees_store, latest_plausible, punches_store
from core.models import Device, DeviceCommand, Employee, PushRejectedLine
from core.zk.client import DeviceUser, Punch

logger = logging.getLogger(__name__)

UNKNOWN_DEVICE = "UNKNOWN DEVICE"
# What the clock is asked to upload: punches and the operation log with users;
# never fingerprint or face templates.
TRANS_FLAG = "TransData AttLog\tOpLog\tEnrollUser\tChgUser"
# Below 2.4.0, so the clock never starts the key exchange nobody implements.
SERVER_VERSION = "2.2.14"
# Commands handed over in one reply (iclock's limits).
MAX_COMMANDS_PER_REPLY = 200
MAX_REPLY_BYTES = 40_000
USER_ID_MAX = 24
# Options kept per device (INFO results, table=options).
MAX_OPTIONS = 300


class AdmsError(Exception):
    """A request the receiver refuses; `status` is the HTTP status to answer with.

    The message never contains the letters OK: the clock reads OK anywhere in
    the body as success.
    """

    def __init__(self, status: int, message: str):
        super().__init__(refusal_text(message))
        self.status = status


def refusal_text(message: str) -> str:
    """The message, or a plain one when it contains OK in any case (a value
    from the request quoted in it, say): the clock must not read success."""
    if "ok" in message.lower():
        return "The request was refused."
    return message


# --- Who is calling --------------------------------------------------------------------


def address_allowed(address: str) -> bool:
    """Whether ADMS_ALLOWED_NETWORKS lets this address call (empty: any)."""
    networks = settings.ADMS_ALLOWED_NETWORKS
    if not networks:
        return True
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


def _clean_serial(serial: str | None) -> str:
    serial = (serial or "").strip()
    if not serial:
        raise AdmsError(400, "The SN parameter (the clock's serial number) is missing.")
    if len(serial) > 64 or not serial.isprintable():
        raise AdmsError(400, "The SN parameter is not a serial number.")
    return serial


def _new_device_name(serial: str) -> str:
    name = f"Clock {serial}"
    taken = set(Device.objects.filter(name__startswith=name).values_list("name", flat=True))
    if name not in taken:
        return name
    number = 2
    while f"{name} ({number})" in taken:
        number += 1
    return f"{name} ({number})"


def device_contact(*, serial: str | None, address: str) -> Device:
    """Finds the device a request comes from and records the contact.

    The device is the one with this serial number: a polled device that has
    it, or a pushing one. An unknown serial gets a new device, disabled unless
    ADMS_AUTO_APPROVE, with the address it came from and first/last seen.
    Idempotent: a second contact finds the same device (the serial is unique
    among devices without an IP address, so two first contacts at once create
    one row) and only moves last seen.

    Raises AdmsError (400) without a serial, (403) from an address outside
    ADMS_ALLOWED_NETWORKS.
    """
    serial = _clean_serial(serial)
    if not address_allowed(address):
        raise AdmsError(403, f"Address {address} may not push (ADMS_ALLOWED_NETWORKS).")
    try:
        ipaddress.ip_address(address)
    except ValueError:
        address = None
    now = timezone.now()
    device = _find(serial)
    if device is None:
        try:
            with transaction.atomic():
                device = Device.objects.create(
                    name=_new_device_name(serial),
                    serial_number=serial,
                    enabled=settings.ADMS_AUTO_APPROVE,
                    first_seen_at=now,
                    last_seen_at=now,
                    push_address=address,
                )
            logger.info(
                "A new clock pushes: serial %s from %s (device id %s)", serial, address, device.pk
            )
            return device
        except IntegrityError:
            device = _find(serial)
            if device is None:
                raise
    fields = {"last_seen_at": now, "push_address": address}
    if device.first_seen_at is None:
        fields["first_seen_at"] = now
    if device.enabled:
        # A clock that calls is up: the status page reads last_success_at.
        fields["last_success_at"] = now
    Device.objects.filter(pk=device.pk).update(**fields)
    for name, value in fields.items():
        setattr(device, name, value)
    return device


def _find(serial: str) -> Device | None:
    # A polled device with this serial wins over a pushing one: one clock, one device.
    devices = list(Device.objects.filter(serial_number=serial)[:10])
    if not devices:
        return None
    return min(devices, key=lambda d: (d.ip_address is None, d.pk))


def _require_approved(device: Device) -> None:
    if not device.enabled:
        raise AdmsError(
            403,
            f"{UNKNOWN_DEVICE}: this serial number is not approved; enable its device in "
            "the admin to accept its records.",
        )


def push_down_after() -> datetime.timedelta:
    """How long a pushing clock may stay silent before it counts as down: three
    of its polls (Delay), or three retries after a failure (ErrorDelay)."""
    seconds = 3 * max(settings.ADMS_DELAY_SECONDS, settings.ADMS_ERROR_DELAY_SECONDS)
    return datetime.timedelta(seconds=seconds)


# --- Handshake -------------------------------------------------------------------------


def timezone_option(zone_name: str, *, now: datetime.datetime) -> int:
    """The TimeZone option: the zone's UTC offset now, whole hours as hours,
    otherwise minutes (the firmware reads |v| < 25 as hours): 330 for Asia/Kolkata."""
    from zoneinfo import ZoneInfo

    offset = now.astimezone(ZoneInfo(zone_name)).utcoffset() or datetime.timedelta()
    minutes = int(offset.total_seconds() // 60)
    return minutes // 60 if minutes % 60 == 0 else minutes


def device_handshake(*, device: Device, legacy: bool) -> str:
    """The handshake reply: the options, every line ending in a newline (the
    firmware ignores a last line without one), or UNKNOWN DEVICE for a device
    not approved (the clock keeps its records and tries again later).

    Reads only. `legacy` (no pushver from the clock) names the stamps as old
    firmware knows them.
    """
    if not device.enabled:
        return UNKNOWN_DEVICE + "\n"
    attlog = device.attlog_stamp or "0"
    operlog = device.operlog_stamp or "0"
    stamps = (
        [f"Stamp={attlog}", f"OpStamp={operlog}"]
        if legacy
        else [f"ATTLOGStamp={attlog}", f"OPERLOGStamp={operlog}"]
    )
    lines = [
        f"GET OPTION FROM: {device.serial_number}",
        *stamps,
        f"ErrorDelay={settings.ADMS_ERROR_DELAY_SECONDS}",
        f"Delay={settings.ADMS_DELAY_SECONDS}",
        f"TransInterval={settings.ADMS_TRANS_INTERVAL_MINUTES}",
        f"TransFlag={TRANS_FLAG}",
        f"TimeZone={timezone_option(device.timezone, now=timezone.now())}",
        "Realtime=1",
        "Encrypt=0",
        f"ServerVer={SERVER_VERSION}",
    ]
    return "\n".join(lines) + "\n"


# --- Uploads ---------------------------------------------------------------------------


@dataclass
class Rejected:
    raw: bytes
    reason: str


@dataclass
class UploadResult:
    table: str
    lines: int = 0
    new: int = 0
    users: int = 0
    rejected: list[Rejected] = field(default_factory=list)

    @property
    def reply(self) -> str:
        return f"OK: {self.lines}"


def _lines(body: bytes) -> list[bytes]:
    """Lines of a body, LF or CRLF, a last line without a newline included."""
    return [line.rstrip(b"\r") for line in body.split(b"\n") if line.strip(b"\r\t \x00")]


def _text(raw: bytes, encoding: str = "utf-8") -> str:
    """Bytes as text to store: invalid bytes and NULs (which PostgreSQL text
    cannot hold) become U+FFFD."""
    try:
        text = raw.decode(encoding)
    except (UnicodeDecodeError, LookupError):
        text = raw.decode("utf-8", errors="replace")
    return text.replace("\x00", "\ufffd")


def _small_int(text: str, what: str) -> int:
    text = text.strip()
    if not text:
        return 0
    if not text.lstrip("-").isdigit():
        raise ValueError(f"{what} {text!r} is not a number")
    number = int(text)
    if not 0 <= number <= 32767:
        raise ValueError(f"{what} {number} is out of range")
    return number


_ISO_SHAPE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\Z", re.ASCII).match


def parse_attlog_line(raw: bytes) -> Punch:
    """One ATTLOG line: PIN, local time, status, verify, work code and any
    further fields, tab-separated (spaces tolerated). Raises ValueError saying
    what is wrong."""
    # Tabs are kept at the ends: an empty first field is an empty PIN.
    text = raw.decode("utf-8", errors="strict").strip(" \r\n")
    if "\t" in text:
        fields = text.split("\t")
        pin, moment, rest = (
            fields[0].strip(),
            fields[1].strip() if len(fields) > 1 else "",
            fields[2:],
        )
    else:
        tokens = text.split()
        pin = tokens[0] if tokens else ""
        moment = " ".join(tokens[1:3])
        rest = tokens[3:]
    if not pin:
        raise ValueError("no user ID (PIN)")
    if len(pin) > USER_ID_MAX or not pin.isprintable():
        raise ValueError(
            f"user ID {pin[:40]!r} is longer than {USER_ID_MAX} characters or not text"
        )
    if not moment:
        raise ValueError("no time")
    try:
        if _ISO_SHAPE(moment):
            # fromisoformat is several times faster than strptime, and on
            # this exact shape reads the same: 150 lines per upload add up.
            timestamp = datetime.datetime.fromisoformat(moment)
        else:
            timestamp = datetime.datetime.strptime(moment, "%Y-%m-%d %H:%M:%S")
    except ValueError:
        raise ValueError(f"time {moment[:40]!r} is not YYYY-MM-DD HH:MM:SS") from None
    if not 1900 <= timestamp.year <= 2199:
        # Far outside what a clock can hold; year 1 would not even convert to UTC.
        raise ValueError(f"year {timestamp.year} is out of range")
    status = _small_int(rest[0], "status") if rest else 0
    verify = _small_int(rest[1], "verify type") if len(rest) > 1 else 0
    # As a poll stores it: the status byte is the verification method, the
    # punch the state (check-in, check-out...).
    return Punch(user_id=pin, timestamp=timestamp, status=verify, punch=status)


def _user_fields(text: str) -> dict[str, str]:
    fields = {}
    for part in text.split("\t"):
        key, sep, value = part.partition("=")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def _card(text: str) -> int:
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        try:
            # [hhhhhhhh]: the card number's bytes, least significant first.
            number = int.from_bytes(bytes.fromhex(text[1:-1]), "little")
        except ValueError:
            return 0
        return number if number < 2**63 else 0
    return int(text) if text.isdigit() and len(text) < 19 else 0


def parse_user_line(raw: bytes, *, encoding: str) -> DeviceUser:
    """One OPERLOG `USER PIN=..\\tName=..` line. The name is read in the device's
    encoding; bytes that are not valid there are replaced, not refused. Raises
    ValueError when the PIN is missing or unusable."""
    head, _, rest = raw.partition(b" ")
    fields = _user_fields(rest.decode("latin-1"))
    pin = fields.get("PIN", "").strip()
    if not pin or len(pin) > USER_ID_MAX or not pin.isprintable():
        raise ValueError("USER line without a usable PIN")
    name_raw = b""
    for part in rest.split(b"\t"):
        if part.startswith(b"Name="):
            name_raw = part[5:]
    name = _text(name_raw.strip(), encoding)
    name = "".join(ch for ch in name if ch.isprintable())[:100]
    try:
        privilege = _small_int(fields.get("Pri", ""), "privilege")
    except ValueError:
        privilege = 0
    return DeviceUser(
        uid=0,
        user_id=pin,
        name=name,
        privilege=privilege,
        password="",
        card=_card(fields.get("Card", "")),
        group_id=fields.get("Grp", ""),
    )


def _stamp(params: dict[str, str]) -> str:
    for key in ("Stamp", "OpStamp", "stamp"):
        value = (params.get(key) or "").strip()
        if value.isdigit() and len(value) <= 20:
            return value
    return ""


def device_upload(
    *, device: Device, table: str, params: dict[str, str], body: bytes
) -> UploadResult:
    """Stores one upload (POST cdata) and returns what to acknowledge.

    ATTLOG: each line becomes a punch, converted and judged as a polled one
    and stored through core.ingest.punches_store; OPERLOG: USER lines
    create or update employees linked to the device, other lines are counted;
    any other table is counted and acknowledged, not stored. Lines that cannot
    be read are kept in PushRejectedLine. Everything, with the table's stamp,
    is written in one transaction: the caller says OK only after it returns.

    Idempotent: a batch sent again stores no punch, user or rejected line
    twice (unique keys), and sets the same stamp.
    Raises AdmsError (403) for a device not approved; database errors propagate.
    """
    _require_approved(device)
    table = (table or "").strip()
    upper = table.upper()
    result = UploadResult(table=table)
    now = timezone.now()
    stamp = _stamp(params)
    if upper == "ATTLOG":
        punches = []
        for raw in _lines(body):
            try:
                punches.append(parse_attlog_line(raw))
            except (ValueError, UnicodeDecodeError) as exc:
                if isinstance(exc, UnicodeDecodeError):
                    reason = "bytes that are not UTF-8 text"
                else:
                    reason = str(exc)
                result.rejected.append(Rejected(raw, reason))
        result.lines = len(punches) + len(result.rejected)
        zone = device.zone
        rows, _suspect = _rows(punches, zone=zone, latest=latest_plausible(zone, now=now))
        with transaction.atomic():
            received_at = timezone.now()
            counts = punches_store(device=device, rows=rows, received_at=received_at)
            _store_rejected(device, upper, result.rejected, received_at)
            # The device list's last error tells of the last upload's bad lines
            # (a clean upload clears it, unless a poll of the same clock set it).
            fields = {}
            error = _rejected_error(result.rejected, upper)
            if error or not device.ip_address:
                fields["last_error"] = error
            if stamp:
                fields["attlog_stamp"] = stamp
            if rows:
                newest = max(row[1] for row in rows)
                if device.newest_record_at is None or newest > device.newest_record_at:
                    fields["newest_record_at"] = newest
            if len(rows) == 1:
                # With Realtime=1 a live punch comes alone, at once: its time
                # against its arrival is the clock's drift. A backlog comes in
                # larger batches, of punches taken long before.
                fields["clock_drift_seconds"] = (rows[0][1] - received_at).total_seconds()
            Device.objects.filter(pk=device.pk).update(**fields)
        result.new = counts.new
        return result
    if upper == "OPERLOG":
        users = []
        lines = _lines(body)
        for raw in lines:
            if raw.startswith(b"USER "):
                try:
                    users.append(parse_user_line(raw, encoding=device.encoding))
                except ValueError as exc:
                    result.rejected.append(Rejected(raw, str(exc)))
        result.lines = len(lines)
        with transaction.atomic():
            result.users = employees_store(device=device, users=users)
            _store_rejected(device, upper, result.rejected, timezone.now())
            if stamp:
                Device.objects.filter(pk=device.pk).update(operlog_stamp=stamp)
        return result
    if upper == "OPTIONS":
        options = _options_line(_text(body))
        _store_options(device, options)
        result.lines = len(options)
        return result
    # ATTPHOTO (one photo per request), ERRORLOG, templates, Security PUSH
    # tables: acknowledged, or the clock would send them again forever.
    result.lines = 1 if upper == "ATTPHOTO" else len(_lines(body))
    return result


def _rejected_error(rejected: list[Rejected], table: str) -> str:
    if not rejected:
        return ""
    return (
        f"{len(rejected)} {table} line(s) of the last upload could not be read "
        f"(Rejected push lines), e.g.: {rejected[0].reason}"
    )


def _store_rejected(device: Device, table: str, rejected: list[Rejected], at: datetime.datetime):
    if not rejected:
        return
    PushRejectedLine.objects.bulk_create(
        [
            PushRejectedLine(
                device=device,
                table=table,
                # A USER line carries the user's password; nobody needs it here.
                line=command_shown(_text(item.raw))[:2000],
                reason=item.reason[:200],
                digest=hashlib.sha256(item.raw).hexdigest(),
                received_at=at,
            )
            for item in rejected
        ],
        ignore_conflicts=True,
    )
    logger.warning(
        "Device %s (id %s): %d %s line(s) could not be read, kept as rejected push lines",
        device.name,
        device.pk,
        len(rejected),
        table,
    )


def _options_line(text: str) -> dict[str, str]:
    """A clock's options (INFO result, table=options), any secret among them
    as *** (they show on the device's page)."""
    options = {}
    for part in command_shown(text).replace("\n", ",").split(","):
        key, sep, value = part.partition("=")
        if sep and key.strip():
            options[key.strip()] = value.strip()
    return options


# Option names the clock uses, and the device fields they fill.
_OPTION_FIELDS = {
    "FWVersion": ("firmware", str),
    "~DeviceName": ("device_name", str),
    "UserCount": ("user_count", int),
    "FPCount": ("fingerprint_count", int),
    "TransactionCount": ("record_count", int),
    "IPAddress": ("reported_ip", str),
    "~Platform": ("platform", str),
}


def _store_options(device: Device, options: dict[str, str]) -> None:
    fields: dict = {}
    for key, (name, kind) in _OPTION_FIELDS.items():
        value = options.get(key, "").strip()
        if not value:
            continue
        if kind is int:
            if value.isdigit() and len(value) < 10:
                fields[name] = int(value)
        else:
            fields[name] = value[: Device._meta.get_field(name).max_length]
    # Bounded: a clock's options are a few dozen; a body of garbage is not kept whole.
    received = dict(list(options.items())[:MAX_OPTIONS])
    merged = {**device.push_options, **{k[:64]: v[:500] for k, v in received.items()}}
    merged = dict(list(merged.items())[:MAX_OPTIONS])
    fields["push_options"] = merged
    Device.objects.filter(pk=device.pk).update(**fields)


# --- Heartbeat and commands ------------------------------------------------------------


def _heartbeat(device: Device, info: str) -> None:
    """getrequest's INFO: firmware, users, fingerprints, records, IP address, ..."""
    parts = [part.strip() for part in info.replace("\x00", "\ufffd").split(",")]
    fields: dict = {}

    def number(index: int) -> int | None:
        if len(parts) > index and parts[index].isdigit() and len(parts[index]) < 10:
            return int(parts[index])
        return None

    if parts and parts[0]:
        fields["firmware"] = parts[0][:64]
    for index, name in ((1, "user_count"), (2, "fingerprint_count"), (3, "record_count")):
        value = number(index)
        if value is not None:
            fields[name] = value
    if len(parts) > 4 and parts[4]:
        fields["reported_ip"] = parts[4][:45]
    if fields:
        Device.objects.filter(pk=device.pk).update(**fields)


def commands_expire(*, device: Device | None = None) -> int:
    """Marks commands sent and unanswered for ADMS_COMMAND_TIMEOUT failed.

    Run when a clock polls, and before commands are read (the API, the
    admin), so that a command for a clock gone silent reads as failed once
    its time is up, not when some clock polls next.

    Idempotent: a conditional UPDATE of sent commands only. Returns how many.
    """
    late = timezone.now() - settings.ADMS_COMMAND_TIMEOUT
    commands = DeviceCommand.objects.filter(state=DeviceCommand.State.SENT, sent_at__lt=late)
    if device is not None:
        commands = commands.filter(device=device)
    return commands.update(
        state=DeviceCommand.State.FAILED,
        result=f"no result within {settings.ADMS_COMMAND_TIMEOUT}",
    )


def device_poll_commands(*, device: Device, info: str | None) -> str:
    """The reply to getrequest: the queued commands as `C:<id>:<command>` lines,
    or exactly `OK` when there are none (the firmware treats `OK\\n` as an
    error). Records the INFO counts, and marks timed-out commands failed.

    Idempotent for each command: one is handed over once (queued → sent by a
    conditional UPDATE); a command sent and not answered is not sent again.
    UNKNOWN DEVICE for a device not approved.
    """
    if not device.enabled:
        return UNKNOWN_DEVICE + "\n"
    if info:
        _heartbeat(device, info)
    # Every clock's: one that stopped polling has its sent commands failed too.
    commands_expire()
    queued = list(
        DeviceCommand.objects.filter(device=device, state=DeviceCommand.State.QUEUED)
        .order_by("pk")
        .values_list("pk", "command")[:MAX_COMMANDS_PER_REPLY]
    )
    if not queued:
        return "OK"
    # A reboot ends the clock's session: after every other command.
    queued.sort(key=lambda item: item[1].strip().upper() == "REBOOT")
    chosen, size = [], 0
    for pk, command in queued:
        line = f"C:{pk}:{command}\n"
        if chosen and size + len(line) > MAX_REPLY_BYTES:
            break
        chosen.append((pk, line))
        size += len(line)
    now = timezone.now()
    with transaction.atomic():
        claimed = DeviceCommand.objects.filter(
            pk__in=[pk for pk, _ in chosen], state=DeviceCommand.State.QUEUED
        ).update(state=DeviceCommand.State.SENT, sent_at=now)
        if claimed != len(chosen):
            # Another request of this clock took some: hand over only ours.
            mine = set(
                DeviceCommand.objects.filter(
                    pk__in=[pk for pk, _ in chosen], state=DeviceCommand.State.SENT, sent_at=now
                ).values_list("pk", flat=True)
            )
            chosen = [(pk, line) for pk, line in chosen if pk in mine]
    return "".join(line for _, line in chosen) or "OK"


@dataclass(frozen=True)
class CommandResult:
    command_id: str
    return_code: int | None
    verb: str
    content: str


def parse_results(body: bytes) -> list[CommandResult]:
    """devicecmd's body: one `ID=..&Return=..&CMD=..` line per result; the lines
    after an INFO result (which carry the clock's options) belong to it."""
    results = []
    current: dict | None = None
    extra: list[str] = []

    def close():
        if current is not None:
            code = current.get("Return", "").strip()
            results.append(
                CommandResult(
                    command_id=current.get("ID", "").strip(),
                    return_code=int(code)
                    if code.lstrip("-").isdigit() and len(code) < 10
                    else None,
                    verb=current.get("CMD", "").strip(),
                    content="\n".join([current.get("_rest", ""), *extra]).strip(),
                )
            )

    for raw in _lines(body):
        text = _text(raw)
        if text.startswith("ID="):
            close()
            current, extra = {}, []
            rest = []
            for part in text.split("&"):
                key, sep, value = part.partition("=")
                if sep and key in ("ID", "Return", "CMD") and key not in current:
                    current[key] = value
                else:
                    rest.append(part)
            current["_rest"] = "&".join(rest)
        elif current is not None:
            extra.append(text)
    close()
    return results


def device_record_results(*, device: Device, body: bytes) -> int:
    """Books the results of devicecmd on the device's commands: done when the
    return code is 0 or more, failed otherwise; an INFO result's options go on
    the device. Returns how many commands were booked.

    A user command the clock carried out (DATA UPDATE / DELETE USERINFO,
    return code 0 or more) is applied to the bridge's copy of its users: the
    employee is created or updated and linked to the device, or unlinked
    from it (the employee and their punches stay).

    Idempotent per (device, command id): a result is booked only on a command
    without one, so the same results posted again change nothing.
    Raises AdmsError (403) for a device not approved.
    """
    _require_approved(device)
    booked = 0
    done: list[int] = []
    now = timezone.now()
    with transaction.atomic():
        for result in parse_results(body):
            if not result.command_id.isdigit() or len(result.command_id) > 18:
                continue
            code = result.return_code
            state = (
                DeviceCommand.State.DONE
                if code is not None and code >= 0
                else DeviceCommand.State.FAILED
            )
            updated = DeviceCommand.objects.filter(
                pk=int(result.command_id), device=device, answered_at__isnull=True
            ).update(
                state=state,
                return_code=code,
                result=command_shown(result.content)[:20_000],
                answered_at=now,
            )
            booked += updated
            if updated and result.verb.upper() == "INFO" and code is not None and code >= 0:
                _store_options(device, _options_line(result.content))
            elif updated and state == DeviceCommand.State.DONE:
                done.append(int(result.command_id))
        if done:
            _apply_user_commands(device, done)
    return booked


def _apply_user_commands(device: Device, command_ids: list[int]) -> None:
    """The bridge's copy of the clock's users after user commands it carried out."""
    # In the order they were queued: the later of two commands on one user wins.
    commands = (
        DeviceCommand.objects.filter(pk__in=command_ids, command__startswith="DATA ")
        .order_by("pk")
        .values_list("command", flat=True)
    )
    written: dict[str, DeviceUser] = {}
    deleted: set[str] = set()
    for command in commands:
        head, _, rest = command.partition("USERINFO ")
        fields = _user_fields(rest)
        pin = fields.get("PIN", "")
        if not pin:
            continue
        if head == "DATA UPDATE ":
            written[pin] = DeviceUser(
                uid=0,
                user_id=pin,
                name=fields.get("Name", ""),
                privilege=int(fields["Pri"]) if fields.get("Pri", "").isdigit() else 0,
                password="",
                card=_card(fields.get("Card", "")),
                group_id="",
            )
            deleted.discard(pin)
        elif head == "DATA DELETE ":
            deleted.add(pin)
            written.pop(pin, None)
    if written:
        employees_store(device=device, users=written.values())
    if deleted:
        Employee.devices.through.objects.filter(
            device=device, employee__user_id__in=deleted
        ).delete()


# --- Queueing commands -----------------------------------------------------------------


class CommandRefused(ValueError):
    """A command that cannot be queued; the message says why."""


def _clean_value(value: str, what: str) -> str:
    value = str(value).strip()
    # A tab or newline would end the field or start another command on the clock.
    if any(not ch.isprintable() for ch in value):
        raise CommandRefused(f"The {what} must be plain text on one line, without tabs.")
    return value


def _user_command(
    *, user_id: str, name: str, privilege: int, card: int, password: str, group: str = ""
) -> str:
    user_id = _clean_value(user_id, "user ID")
    if not user_id or len(user_id) > USER_ID_MAX:
        raise CommandRefused(f"A user ID of 1 to {USER_ID_MAX} characters is needed.")
    fields = {
        "PIN": user_id,
        "Name": _clean_value(name, "name"),
        "Pri": str(int(privilege)),
        "Passwd": _clean_value(password, "password"),
        "Card": str(int(card)) if card else "",
        # The clock's default group unless one is given.
        "Grp": _clean_value(group, "group") or "1",
        "TZ": "0000000000000000",
        "Verify": "0",
        "ViceCard": "",
    }
    return "DATA UPDATE USERINFO " + "\t".join(f"{k}={v}" for k, v in fields.items())


# A secret's field in the protocol's key=value text: a user's password
# (Passwd), or a comm key (ComKey, PushCommKey...) should a clock report one;
# the field begins the text or follows a tab, newline, space, comma or &.
_SECRET_FIELD = re.compile(
    r"(?<![^\s,&])([~\w]*?(?:passwd|password|pwd|comm?key)=)[^\t\r\n,&]+", re.IGNORECASE
)


def command_shown(command: str) -> str:
    """A command line, an uploaded line or a clock's answer as people may
    read it, on a page, in a log or in the database where nothing needs the
    secret: each secret's value as ***. The one masking of the push protocol's
    text; an empty value stays empty (no password set)."""
    return _SECRET_FIELD.sub(r"\1***", command)


def command_text(
    kind: str,
    *,
    start: datetime.datetime | None = None,
    end: datetime.datetime | None = None,
    user_id: str = "",
    name: str = "",
    privilege: int = 0,
    card: int = 0,
    password: str = "",
    group: str = "",
) -> str:
    """The command line for one kind of command. `start`/`end` are the clock's
    local times. Raises CommandRefused for a kind not offered or bad values.

    Kinds: info, check, reboot, reupload (start, end), user_update (user_id,
    name, privilege, card, password, group), user_delete (user_id). Nothing that
    clears a clock's log or data is offered.
    """
    if kind == "info":
        return "INFO"
    if kind == "check":
        return "CHECK"
    if kind == "reboot":
        return "REBOOT"
    if kind == "reupload":
        if start is None or end is None or end < start:
            raise CommandRefused("A re-upload needs a start and an end, the end after the start.")
        return f"DATA QUERY ATTLOG StartTime={start:%Y-%m-%d %H:%M:%S}\tEndTime={end:%Y-%m-%d %H:%M:%S}"
    if kind == "user_update":
        return _user_command(
            user_id=user_id,
            name=name,
            privilege=privilege,
            card=card,
            password=password,
            group=group,
        )
    if kind == "user_delete":
        user_id = _clean_value(user_id, "user ID")
        if not user_id or len(user_id) > USER_ID_MAX:
            raise CommandRefused(f"A user ID of 1 to {USER_ID_MAX} characters is needed.")
        return f"DATA DELETE USERINFO PIN={user_id}"
    raise CommandRefused(f"Unknown command {kind!r}.")


COMMAND_KINDS = ("info", "check", "reboot", "reupload", "user_update", "user_delete")


def device_command_queue(*, device: Device, command: str, created_by: str = "") -> DeviceCommand:
    """Queues a command (from command_text) for a pushing clock; it is handed
    over at the clock's next poll.

    Not idempotent by design: each call is one more command (asking twice for
    INFO asks twice). Raises CommandRefused when the device has never pushed
    (a polled clock never asks for commands).
    """
    if not device.pushes:
        raise CommandRefused(
            f"{device.name} has never called this server (Cloud server): it cannot take "
            "commands. Polled clocks are managed with Poll now, Test connection and Sync clock."
        )
    return DeviceCommand.objects.create(device=device, command=command, created_by=created_by)


@dataclass
class QueueResult:
    queued: list[DeviceCommand] = field(default_factory=list)
    # One line per device or employee that got no command, saying why.
    refused: list[str] = field(default_factory=list)


def devices_command_queue(
    *, devices: Iterable[Device], kind: str, created_by: str = "", **values
) -> QueueResult:
    """Queues one kind of command (see command_text) for each device.

    Devices that have never pushed get none and are named in `refused`.
    Not idempotent by design (see device_command_queue). Raises CommandRefused
    when the kind or its values are not acceptable, before queueing anything.
    """
    command = command_text(kind, **values)
    result = QueueResult()
    for device in devices:
        try:
            result.queued.append(
                device_command_queue(device=device, command=command, created_by=created_by)
            )
        except CommandRefused as exc:
            result.refused.append(str(exc))
    return result


def employees_command_queue(
    *, employees: Iterable[Employee], delete: bool, created_by: str = ""
) -> QueueResult:
    """Queues, for each employee, DATA UPDATE USERINFO (their user ID, name,
    privilege and card) or DATA DELETE USERINFO on every enabled pushing clock
    they are linked to (Employee.devices).

    Not idempotent by design: each call queues the commands again (the clock
    applies an update or delete twice to the same end). Employees linked to no
    pushing clock, or whose values cannot be sent, are named in `refused`.
    """
    result = QueueResult()
    for employee in employees:
        devices = [d for d in employee.devices.filter(enabled=True, first_seen_at__isnull=False)]
        if not devices:
            result.refused.append(f"{employee}: linked to no enabled pushing clock.")
            continue
        try:
            if delete:
                command = command_text("user_delete", user_id=employee.user_id)
            else:
                command = command_text(
                    "user_update",
                    user_id=employee.user_id,
                    name=employee.name,
                    privilege=employee.privilege,
                    card=employee.card,
                )
        except CommandRefused as exc:
            result.refused.append(f"{employee}: {exc}")
            continue
        for device in devices:
            result.queued.append(
                DeviceCommand.objects.create(device=device, command=command, created_by=created_by)
            )
    return result
