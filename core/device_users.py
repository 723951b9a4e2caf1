"""The users on a clock: read them live, add or change one, delete one, import many.

Each function opens one connection to the device, under its lease
(core.ingest.device_session: never while a poll runs), checks every user against
what that device can store (its PIN width, the byte limits of its user record
in its encoding) before it writes anything, and raises:

- DeviceUserInvalid when a user does not fit (nothing was written);
- core.zk.client.DeviceError subclasses when the device cannot be reached or
  refuses (DeviceTimeout when it did not answer in time), or is busy
  (core.ingest.DeviceBusy: another worker holds it; nothing was sent).

Writes are idempotent: a user is matched by its user id, so saving the same
user again rewrites the same slot (uid), and deleting a user that is gone
reports that it was not there. Users written are upserted into Employee too
(core.ingest.employees_store), as a poll would.

A device without an IP address is a clock that pushes (core.adms): it cannot
be reached, so the same functions queue commands for it instead (DATA UPDATE
USERINFO, DATA DELETE USERINFO), handed over at its next poll, and return
PushQueued; its users are read from the bridge's copy (the employees linked
to it, kept by its OPERLOG uploads). They raise ClockNotReady when the clock
has never called or is not approved, and DeviceUserInvalid as above.

The import source (import_source_fetch) is fetched only over http(s) from a
host in USER_IMPORT_ALLOWED_HOSTS, with a timeout and a size limit.
"""

from __future__ import annotations

import json
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import requests
from django.conf import settings
from django.db import transaction

from core import adms
from core.ingest import device_session, employees_store
from core.models import Device, DeviceCommand, Employee
from core.zk.client import DeviceClient, DeviceUser

# Privilege values clocks take: a user, or an administrator of the clock's menu.
PRIVILEGES = {0: "user", 14: "admin"}
# Byte limits of the two user record layouts (core.zk.protocol USER_72, USER_28).
NAME_BYTES = {72: 24, 28: 8}
PASSWORD_BYTES = {72: 8, 28: 5}
GROUP_BYTES = 7
MAX_CARD = 0xFFFFFFFF
MAX_UID = 0xFFFF
IMPORT_MAX_USERS = 5000
FIELDS = ("user_id", "name", "privilege", "password", "card", "group_id", "uid")


class DeviceUserInvalid(ValueError):
    """Users that do not fit the device. `errors` maps a field (or, for an
    import, the user's position in the list) to what is wrong with it."""

    def __init__(self, errors: dict):
        self.errors = errors
        super().__init__(json.dumps(errors))


class ClockNotReady(Exception):
    """A pushing clock that cannot take commands yet: it has never called the
    bridge, or it is waiting for approval. The message says what to do."""


class ImportSourceError(ValueError):
    """The import URL is not allowed, could not be fetched, or is not a list of users."""


@dataclass(frozen=True)
class UserInput:
    """A user as an operator gives it: uid is optional (the device's slot)."""

    user_id: str
    name: str = ""
    privilege: int = 0
    password: str = ""
    card: int = 0
    group_id: str = ""
    uid: int | None = None


@dataclass
class ImportResult:
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    # Each user written, with the record it replaced (None when added): what
    # the audit log records. Users left as they were are not listed.
    written: list[tuple[DeviceUser, DeviceUser | None]] = field(default_factory=list)


@dataclass
class DeviceUsers:
    """The users of a clock: read live from it, or (`live` False, a pushing
    clock) the bridge's copy, where uid, password and group are not known."""

    users: list[DeviceUser]
    live: bool


@dataclass
class PushQueued:
    """Commands queued for a pushing clock, in the order given; each user's
    record with the bridge's copy of it before (None when unknown)."""

    commands: list[DeviceCommand] = field(default_factory=list)
    written: list[tuple[DeviceUser, DeviceUser | None]] = field(default_factory=list)


# --- Checks --------------------------------------------------------------------------


def _byte_length(text: str, encoding: str) -> int | None:
    try:
        return len(text.encode(encoding))
    except UnicodeEncodeError:
        return None


def _problems(user: UserInput, *, pin_width: int, record_size: int, encoding: str) -> dict:
    errors: dict[str, str] = {}
    user_id = user.user_id
    if not user_id:
        errors["user_id"] = "A user id is required."
    elif not (user_id.isascii() and user_id.isalnum()):
        errors["user_id"] = f"{user_id!r}: a user id is letters and digits only."
    elif len(user_id) > pin_width:
        errors["user_id"] = (
            f"{user_id!r} has {len(user_id)} characters; this device takes user ids of at "
            f"most {pin_width} (its PIN width)."
        )
    elif record_size == 28 and not (user_id.isdigit() and int(user_id) <= MAX_CARD):
        errors["user_id"] = f"{user_id!r}: over UDP this device takes numeric user ids only."
    limit = NAME_BYTES[record_size]
    size = _byte_length(user.name, encoding)
    if size is None:
        errors["name"] = f"{user.name!r} cannot be written in the device's encoding ({encoding})."
    elif size > limit:
        errors["name"] = (
            f"{user.name!r} is {size} bytes in {encoding}; the device stores at most {limit}."
        )
    if user.privilege not in PRIVILEGES:
        errors["privilege"] = "0 (user) or 14 (admin)."
    limit = PASSWORD_BYTES[record_size]
    if not (user.password.isascii() and user.password.isdigit()) and user.password:
        errors["password"] = "A password is digits only."
    elif len(user.password) > limit:
        errors["password"] = f"At most {limit} digits on this device."
    if not 0 <= user.card <= MAX_CARD:
        errors["card"] = f"A card number from 0 to {MAX_CARD}."
    if record_size == 28:
        if user.group_id and not user.group_id.isdigit():
            errors["group_id"] = "Over UDP the group is a number."
    elif not user.group_id.isascii() or len(user.group_id) > GROUP_BYTES:
        errors["group_id"] = f"At most {GROUP_BYTES} ASCII characters."
    if user.uid is not None and not 1 <= user.uid <= MAX_UID:
        errors["uid"] = f"A uid from 1 to {MAX_UID}."
    return errors


def _plan(
    users: Sequence[UserInput], *, on_device: list[DeviceUser], client: DeviceClient, index: bool
) -> list[tuple[DeviceUser, DeviceUser | None]]:
    """Each input as the device record to write, with the record it replaces.

    Raises DeviceUserInvalid naming every problem, before anything is written.
    """
    pin_width = client.read_pin_width()
    record_size = client.user_record_size
    by_user_id = {u.user_id: u for u in on_device}
    by_uid = {u.uid: u for u in on_device}
    next_uid = max(by_uid, default=0) + 1
    errors: dict = {}
    seen: set[str] = set()
    plan = []
    for position, user in enumerate(users):
        problems = _problems(
            user, pin_width=pin_width, record_size=record_size, encoding=client.encoding
        )
        if user.user_id in seen:
            problems["user_id"] = f"{user.user_id!r} is in the list twice."
        seen.add(user.user_id)
        current = by_user_id.get(user.user_id)
        uid = user.uid
        if uid is None:
            uid = current.uid if current else next_uid
        elif uid in by_uid and by_uid[uid].user_id != user.user_id:
            problems["uid"] = f"uid {uid} belongs to user {by_uid[uid].user_id!r} on the device."
        elif current is not None and current.uid != uid:
            problems["uid"] = f"user {user.user_id!r} already has uid {current.uid} on the device."
        if problems:
            errors[str(position) if index else "user"] = problems
            continue
        if uid == next_uid:
            next_uid += 1
        if next_uid > MAX_UID:
            errors[str(position) if index else "user"] = {"uid": "The device has no free uid."}
            continue
        record = DeviceUser(
            uid=uid,
            user_id=user.user_id,
            name=user.name,
            privilege=user.privilege,
            password=user.password,
            card=user.card,
            group_id=user.group_id,
        )
        plan.append((record, current))
    if errors:
        raise DeviceUserInvalid(errors if index else errors["user"])
    return plan


def _same(a: DeviceUser, b: DeviceUser | None) -> bool:
    return b is not None and replace(a, name_problem="") == replace(b, name_problem="")


# --- Stage functions -------------------------------------------------------------------


def device_users_list(*, device: Device) -> DeviceUsers:
    """The users on the device, read live; for a pushing clock, the bridge's
    copy (live False). Reads only. Raises DeviceError."""
    if _pushing(device):
        return DeviceUsers(users=list(_bridge_copy(device).values()), live=False)
    with device_session(device) as client:
        return DeviceUsers(users=client.read_users(), live=True)


def device_user_save(
    *, device: Device, user: UserInput, created_by: str = ""
) -> tuple[DeviceUser, DeviceUser | None] | PushQueued:
    """Adds the user to the device, or updates the one with the same user id.

    Returns the record as written and the record it replaced (None when the
    user was new; equal to the first when nothing needed writing). Idempotent:
    the same user saved again keeps its uid and is not written again.
    Raises DeviceUserInvalid (nothing written) or DeviceError.

    A pushing clock gets a DATA UPDATE USERINFO command queued instead
    (PushQueued); not idempotent by design: each call queues one more command,
    which the clock applies to the same end. Raises ClockNotReady.
    """
    if _pushing(device):
        return _push_queue(device, [user], index=False, created_by=created_by)
    with device_session(device) as client:
        ((record, current),) = _plan(
            [user], on_device=client.read_users(), client=client, index=False
        )
        if not _same(record, current):
            client.write_user(record)
    employees_store(device=device, users=[record])
    return record, current


def device_user_delete(
    *, device: Device, user_id: str, created_by: str = ""
) -> DeviceUser | None | PushQueued:
    """Deletes the user with this user id from the device; returns the record
    deleted, or None when no user has that user id.

    Idempotent: a second delete finds no user and writes nothing. The
    employee and their punches stay: they are history. Raises DeviceError.

    A pushing clock gets a DATA DELETE USERINFO command queued instead
    (PushQueued, with the bridge's copy of the user when it has one): the
    bridge cannot see whether the clock holds the user, and deleting one that
    is not there changes nothing on the clock. Raises ClockNotReady, or
    DeviceUserInvalid when the user id cannot be sent.
    """
    if _pushing(device):
        _require_ready(device)
        try:
            command = adms.command_text("user_delete", user_id=user_id)
        except adms.CommandRefused as exc:
            raise DeviceUserInvalid({"user_id": str(exc)}) from None
        before = _bridge_copy(device, [user_id]).get(user_id) or DeviceUser(
            uid=0, user_id=user_id, name="", privilege=0, password="", card=0, group_id=""
        )
        queued = DeviceCommand.objects.create(device=device, command=command, created_by=created_by)
        return PushQueued(commands=[queued], written=[(None, before)])
    with device_session(device) as client:
        match = next((u for u in client.read_users() if u.user_id == user_id), None)
        if match is None:
            return None
        client.delete_user(match.uid)
    return match


def device_users_import(
    *, device: Device, users: Sequence[UserInput], created_by: str = ""
) -> ImportResult | PushQueued:
    """Adds or updates many users on the device over one connection.

    Every user is checked first; one that does not fit stops the import
    before anything is written (DeviceUserInvalid, keyed by position in the
    list). Idempotent: users already on the device as given are not written
    again. Raises DeviceError when the device fails; users written before the
    failure stay written, and importing the list again completes it.

    A pushing clock gets one DATA UPDATE USERINFO command per user, queued
    together in one transaction after every user was checked (PushQueued);
    not idempotent by design (see device_user_save). Raises ClockNotReady.
    """
    if _pushing(device):
        return _push_queue(device, users, index=True, created_by=created_by)
    result = ImportResult()
    with device_session(device) as client:
        plan = _plan(users, on_device=client.read_users(), client=client, index=True)
        for record, current in plan:
            if _same(record, current):
                result.unchanged += 1
                continue
            client.write_user(record)
            result.written.append((record, current))
            if current is None:
                result.added += 1
            else:
                result.updated += 1
    employees_store(device=device, users=[record for record, _ in plan])
    return result


# --- Pushing clocks ----------------------------------------------------------------


def _pushing(device: Device) -> bool:
    # A device with an address is polled, even when its clock pushes too.
    return not device.ip_address


def _require_ready(device: Device) -> None:
    if not device.pushes:
        raise ClockNotReady(
            f"{device.name} has no IP address and has never called this server (Cloud "
            "server): set its IP address to reach it over the network, or set the clock "
            "to push to the bridge; commands wait for its first call."
        )
    if not device.enabled:
        raise ClockNotReady(
            f"{device.name} is waiting for approval: enable it in the admin before sending "
            "it users."
        )


def _bridge_copy(device: Device, user_ids: Sequence[str] | None = None) -> dict[str, DeviceUser]:
    """The employees linked to the device (core.adms keeps them from its
    OPERLOG uploads) as device users, by user id; uid, password and group
    are not known there."""
    rows = Employee.objects.filter(devices=device).order_by("user_id")
    if user_ids is not None:
        rows = rows.filter(user_id__in=list(user_ids))
    return {
        user_id: DeviceUser(
            uid=0,
            user_id=user_id,
            name=name,
            privilege=privilege,
            password="",
            card=card,
            group_id="",
        )
        for user_id, name, privilege, card in rows.values_list(
            "user_id", "name", "privilege", "card"
        )
    }


def push_pin_width(device: Device) -> int:
    """The user id length a pushing clock takes: its ~PIN2Width option when
    an INFO result reported one, else the push protocol's limit."""
    value = str(device.push_options.get("~PIN2Width", "")).strip()
    if value.isdigit() and 1 <= int(value) <= adms.USER_ID_MAX:
        return int(value)
    return adms.USER_ID_MAX


def _push_queue(
    device: Device, users: Sequence[UserInput], *, index: bool, created_by: str
) -> PushQueued:
    """Checks every user as for a polled clock (the 72-byte record: names of
    24 bytes in the device's encoding), then queues one DATA UPDATE USERINFO
    each, all or none."""
    _require_ready(device)
    pin_width = push_pin_width(device)
    known = _bridge_copy(device, [u.user_id for u in users])
    errors: dict = {}
    seen: set[str] = set()
    planned = []
    for position, user in enumerate(users):
        problems = _problems(user, pin_width=pin_width, record_size=72, encoding=device.encoding)
        problems.pop("group_id", None)
        group = user.group_id
        if group and not (group.isascii() and group.isdigit() and 1 <= int(group) <= 99):
            problems["group_id"] = "On a pushing clock the group is a number from 1 to 99."
        if user.uid is not None:
            problems["uid"] = "A pushing clock keeps users by user id: leave uid out."
        if user.user_id in seen:
            problems["user_id"] = f"{user.user_id!r} is in the list twice."
        seen.add(user.user_id)
        if not problems:
            try:
                command = adms.command_text(
                    "user_update",
                    user_id=user.user_id,
                    name=user.name,
                    privilege=user.privilege,
                    card=user.card,
                    password=user.password,
                    group=user.group_id,
                )
            except adms.CommandRefused as exc:
                problems["command"] = str(exc)
        if problems:
            errors[str(position) if index else "user"] = problems
            continue
        record = DeviceUser(
            uid=0,
            user_id=user.user_id,
            name=user.name,
            privilege=user.privilege,
            password=user.password,
            card=user.card,
            group_id=user.group_id,
        )
        planned.append((command, record, known.get(user.user_id)))
    if errors:
        raise DeviceUserInvalid(errors if index else errors["user"])
    with transaction.atomic():
        # Ids in list order: the clock takes its commands in id order.
        commands = DeviceCommand.objects.bulk_create(
            [
                DeviceCommand(device=device, command=command, created_by=created_by)
                for command, _, _ in planned
            ]
        )
    return PushQueued(
        commands=commands, written=[(record, before) for _, record, before in planned]
    )


# --- The import source ---------------------------------------------------------------


def users_parse(data: object) -> list[UserInput]:
    """A JSON value as a list of users; raises ImportSourceError saying what is wrong."""
    if not isinstance(data, list):
        raise ImportSourceError(
            f"Expected a JSON list of users, got a JSON {type(data).__name__ if data is not None else 'null'}."
        )
    if not data:
        raise ImportSourceError("The list of users is empty.")
    if len(data) > IMPORT_MAX_USERS:
        raise ImportSourceError(f"{len(data)} users; one import takes at most {IMPORT_MAX_USERS}.")
    users = []
    for position, item in enumerate(data):
        users.append(_user_from_json(item, position))
    return users


def _user_from_json(item: object, position: int) -> UserInput:
    where = f"User {position}"
    if not isinstance(item, dict):
        raise ImportSourceError(f"{where} is not an object with a user_id.")
    unknown = sorted(set(item) - set(FIELDS))
    if unknown:
        raise ImportSourceError(f"{where} has unknown fields: {', '.join(unknown)}.")
    user_id = item.get("user_id")
    if isinstance(user_id, int) and not isinstance(user_id, bool):
        user_id = str(user_id)
    if not isinstance(user_id, str) or not user_id:
        raise ImportSourceError(f"{where} has no user_id (a string).")
    values: dict = {"user_id": user_id}
    for name in ("name", "password", "group_id"):
        if name in item:
            if not isinstance(item[name], str):
                raise ImportSourceError(f"{where}: {name} must be a string.")
            values[name] = item[name]
    for name in ("privilege", "card", "uid"):
        if name in item and item[name] is not None:
            value = item[name]
            if not isinstance(value, int) or isinstance(value, bool):
                raise ImportSourceError(f"{where}: {name} must be a whole number.")
            values[name] = value
    return UserInput(**values)


def import_source_fetch(*, url: str) -> list[UserInput]:
    """Fetches a JSON list of users from `url`.

    Only http and https, only hosts in USER_IMPORT_ALLOWED_HOSTS, no redirects
    (they could lead elsewhere), at most USER_IMPORT_MAX_BYTES within
    USER_IMPORT_TIMEOUT_SECONDS. Reads only. Raises ImportSourceError saying
    what was wrong.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ImportSourceError(f"Only http and https URLs are fetched, not {parts.scheme!r}.")
    host = (parts.hostname or "").lower()
    allowed = {h.lower().strip("[]") for h in settings.USER_IMPORT_ALLOWED_HOSTS}
    if not host or host not in allowed:
        raise ImportSourceError(
            f"{host or url!r} is not in USER_IMPORT_ALLOWED_HOSTS; an operator allows the "
            "hosts users may be imported from."
        )
    limit = settings.USER_IMPORT_MAX_BYTES
    timeout = settings.USER_IMPORT_TIMEOUT_SECONDS
    try:
        with requests.get(url, timeout=timeout, stream=True, allow_redirects=False) as answer:
            if answer.status_code != 200:
                raise ImportSourceError(f"{url} answered HTTP {answer.status_code}, not 200.")
            declared = answer.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > limit:
                raise ImportSourceError(
                    f"{url} sends {declared} bytes; USER_IMPORT_MAX_BYTES allows {limit}."
                )
            body = bytearray()
            # The timeout bounds each wait for bytes; the deadline bounds the whole
            # transfer, so a server that drips bytes cannot hold the request.
            deadline = time.monotonic() + timeout
            for chunk in answer.iter_content(chunk_size=65536):
                body += chunk
                if time.monotonic() > deadline:
                    raise ImportSourceError(f"{url} took longer than {timeout:g} s to send.")
                if len(body) > limit:
                    raise ImportSourceError(
                        f"{url} sent more than {limit} bytes (USER_IMPORT_MAX_BYTES)."
                    )
    except requests.Timeout:
        raise ImportSourceError(f"{url} did not answer within {timeout:g} s.") from None
    except requests.RequestException as exc:
        raise ImportSourceError(f"{url} could not be fetched: {exc}") from None
    try:
        data = json.loads(bytes(body))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ImportSourceError(f"{url} did not send JSON: {exc}") from None
    return users_parse(data)
