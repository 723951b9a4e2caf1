"""Generated device data: a realistic log of shifts, breaks and double taps."""

import random
from datetime import date, datetime, timedelta
from datetime import time as dtime

from core.zk.emulator.state import (
    AttendanceRecord,
    DeviceState,
    FingerTemplate,
    UserRecord,
    _check_int,
)

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


def generate_state(
    users: int = 50,
    punches: int = 5000,
    days: int = 30,
    seed: int = 1,
    *,
    now: datetime | None = None,
) -> DeviceState:
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
    weekdays = max(1, sum(1 for k in range(days + 1) if (now.date() - timedelta(k)).weekday() < 5))
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
    return DeviceState(users=user_records, attendance=log, templates=templates)


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


def next_punch_of(state: DeviceState, user_id: str, today: date) -> tuple[int, int]:
    """(verification, punch) of a live punch: the same verification as the
    user's last punch; out if they are in today, otherwise in."""
    with state.lock:
        last = next((r for r in reversed(state.attendance) if r.user_id == user_id), None)
    if last is None:
        return 1, 0
    inside = last.timestamp.date() == today and last.punch in (0, 3)
    return last.status, 1 if inside else 0
