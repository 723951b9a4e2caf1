"""The clock's data (users, attendance log, fingerprint templates, options) and
its JSON form, with the validation of loaded data."""

import json
import threading
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

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
        """A realistic clock; see generate.generate_state."""
        from core.zk.emulator.generate import generate_state

        return generate_state(users, punches, days, seed, now=now)


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
