"""Computed days against stored rows, without a database (core.processing.diff)."""

import datetime
from zoneinfo import ZoneInfo

from core.processing.diff import ROW_COLUMNS, StoredDay, diff_days
from core.processing.rules import Hours
from core.processing.shifts import Calendar, build_shifts, day_values
from core.tests.factories import DEFAULT_RULES as RULES

UTC = datetime.UTC
H = datetime.timedelta(hours=1)
CALENDAR = Calendar(RULES, {1: Hours(ZoneInfo("UTC"), None, None)}, ZoneInfo("UTC"))
MON = datetime.date(2026, 11, 2)
TUE = datetime.date(2026, 11, 3)


def moment(day: datetime.date, hour: int) -> datetime.datetime:
    return datetime.datetime.combine(day, datetime.time(hour), tzinfo=UTC)


def shifts(*moments: datetime.datetime):
    chain = build_shifts(
        [(m, 1, False, m + H) for m in moments], max_shift=RULES.max_shift, dedupe=RULES.dedupe
    )
    CALENDAR.date_shifts(chain)
    return chain


def stored_as(chain, pk: int, **fields) -> StoredDay:
    values = day_values(chain, employee_id=None, employee=None, calendar=CALENDAR)
    return StoredDay(
        pk=pk,
        values=values,
        is_manual=fields.get("is_manual", False),
        version=fields.get("version", 1),
        has_newer_punches=False,
        seen_at=fields.get("seen_at"),
    )


def diff(chain, stored, *, low=None, high=None):
    return diff_days(
        user_id="1001",
        shifts=chain,
        stored=stored,
        low=low,
        high=high,
        employee_id=None,
        employee=None,
        calendar=CALENDAR,
    )


def test_days_that_match_their_stored_rows_give_no_change():
    chain = shifts(moment(MON, 8), moment(MON, 17), moment(TUE, 8), moment(TUE, 17))
    stored = {MON: stored_as(chain[:1], 10), TUE: stored_as(chain[1:], 11)}

    result = diff(chain, stored)

    assert (result.new, result.changed, result.vanished, result.flagged) == ([], [], [], [])
    assert result.outliers == 0


def test_a_day_whose_values_changed_is_rewritten_with_the_next_version():
    stored = {MON: stored_as(shifts(moment(MON, 8)), 10, version=3)}

    result = diff(shifts(moment(MON, 8), moment(MON, 17)), stored)

    [(pk, row)] = result.changed
    assert pk == 10
    row = dict(zip(ROW_COLUMNS, row, strict=True))
    assert (row["user_id"], row["work_date"], row["version"]) == ("1001", MON, 4)
    assert (row["clock_out"], row["punch_count"]) == (moment(MON, 17), 2)
    assert result.new == []


def test_a_stored_day_the_shifts_no_longer_give_vanishes_only_inside_the_bounds():
    chain = shifts(moment(MON, 22), moment(TUE, 6))
    stored = {TUE: stored_as(shifts(moment(TUE, 6)), 11)}

    assert diff(chain, stored).vanished == [11]
    assert diff(chain, stored, high=moment(TUE, 6)).vanished == []
    assert [row[1] for row in diff(chain, stored).new] == [MON]


def test_shifts_outside_the_bounds_are_left_to_the_stored_rows():
    chain = shifts(moment(MON, 8), moment(TUE, 8))

    result = diff(chain, {}, low=moment(MON, 9), high=moment(TUE, 9))

    assert [row[1] for row in result.new] == [TUE]


def test_an_hr_edited_day_is_never_changed_and_is_flagged_for_punches_received_after_the_edit():
    edited = stored_as(shifts(moment(MON, 8)), 10, is_manual=True, seen_at=moment(MON, 12))
    before_edit = shifts(moment(MON, 8), moment(MON, 10))  # received at 11:00
    after_edit = shifts(moment(MON, 8), moment(MON, 17))  # received at 18:00

    assert diff(before_edit, {MON: edited}).flagged == []
    result = diff(after_edit, {MON: edited})
    assert result.flagged == [10]
    assert (result.new, result.changed, result.vanished) == ([], [], [])
