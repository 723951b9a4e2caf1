"""An operator's verdict on punches (core.ingest.punches_judge)."""

import datetime

import pytest
import time_machine

from core.ingest import punches_judge
from core.models import ProcessedAttendance, RawAttendance
from core.processing import attendance_process, attendance_recompute
from core.tests.factories import DeviceFactory, RawAttendanceFactory

pytestmark = pytest.mark.django_db

UTC = datetime.UTC
NOW = datetime.datetime(2026, 12, 2, 9, 30, tzinfo=UTC)


@pytest.fixture
def alice(django_user_model):
    return django_user_model.objects.create_user("alice", is_staff=True)


@pytest.fixture
def punches():
    device = DeviceFactory()
    plausible = RawAttendanceFactory(device=device, user_id="1001")
    flagged = RawAttendanceFactory(
        device=device, user_id="1002", is_suspect=True, suspect_reason="before 2001"
    )
    other = RawAttendanceFactory(device=device, user_id="1003")
    return plausible, flagged, other


def test_marking_a_punch_suspect_records_who_why_and_when(punches, alice):
    plausible, _, other = punches
    with time_machine.travel(NOW, tick=False):
        written = punches_judge(
            ids=[plausible.pk], suspect=True, reason="  badge lent to   a colleague ", user=alice
        )
    assert written == 1
    plausible.refresh_from_db()
    assert plausible.is_suspect is True
    assert plausible.suspect_override is True
    assert plausible.suspect_reason == "marked suspect by alice: badge lent to a colleague"
    assert plausible.suspect_override_by == "alice"
    assert plausible.suspect_override_at == NOW
    assert plausible.revised_at == NOW
    other.refresh_from_db()
    assert (other.is_suspect, other.suspect_override, other.revised_at) == (False, None, None)


def test_clearing_an_automatic_suspect_flag_makes_the_punch_count_again(punches, alice):
    _, flagged, _ = punches
    with time_machine.travel(NOW, tick=False):
        written = punches_judge(
            ids=[flagged.pk], suspect=False, reason="clock was set that day", user=alice
        )
    assert written == 1
    flagged.refresh_from_db()
    assert flagged.is_suspect is False
    assert flagged.suspect_override is False
    assert flagged.suspect_reason == "cleared by alice: clock was set that day"
    assert flagged.revised_at == NOW


def test_confirming_the_automatic_verdict_records_it_without_a_revision(punches, alice):
    _, flagged, _ = punches
    written = punches_judge(ids=[flagged.pk], suspect=True, reason="checked", user=alice)
    assert written == 1
    flagged.refresh_from_db()
    assert flagged.suspect_override is True
    assert flagged.suspect_reason == "marked suspect by alice: checked"
    # is_suspect did not change, so the day it belongs to need not be recomputed.
    assert flagged.revised_at is None


def test_judging_punches_the_same_way_again_writes_nothing(punches, alice, django_user_model):
    plausible, flagged, _ = punches
    with time_machine.travel(NOW, tick=False):
        punches_judge(ids=[plausible.pk, flagged.pk], suspect=True, reason="first", user=alice)
    bob = django_user_model.objects.create_user("bob")
    with time_machine.travel(NOW + datetime.timedelta(hours=1), tick=False):
        written = punches_judge(
            ids=[plausible.pk, flagged.pk], suspect=True, reason="again", user=bob
        )
    assert written == 0
    plausible.refresh_from_db()
    assert plausible.suspect_reason == "marked suspect by alice: first"
    assert plausible.suspect_override_at == NOW
    assert plausible.revised_at == NOW


def test_an_operator_can_reverse_an_earlier_operator_verdict(punches, alice):
    plausible, _, _ = punches
    punches_judge(ids=[plausible.pk], suspect=True, reason="looked wrong", user=alice)
    later = NOW + datetime.timedelta(days=1)
    with time_machine.travel(later, tick=False):
        written = punches_judge(ids=[plausible.pk], suspect=False, reason="it was fine", user=alice)
    assert written == 1
    plausible.refresh_from_db()
    assert (plausible.is_suspect, plausible.suspect_override) == (False, False)
    assert plausible.revised_at == later


@pytest.mark.parametrize("reason", ["", "   ", "\n\t"])
def test_a_blank_reason_is_refused_and_nothing_is_written(punches, alice, reason):
    plausible, _, _ = punches
    with pytest.raises(ValueError, match="Give a reason"):
        punches_judge(ids=[plausible.pk], suspect=True, reason=reason, user=alice)
    plausible.refresh_from_db()
    assert (plausible.is_suspect, plausible.suspect_override) == (False, None)


def test_a_reason_too_long_to_record_is_refused_saying_how_long_it_may_be(punches, alice):
    plausible, _, _ = punches
    fits = 200 - len("marked suspect by alice: ")
    with pytest.raises(ValueError, match=f"201 characters long; at most {fits} fit"):
        punches_judge(ids=[plausible.pk], suspect=True, reason="x" * 201, user=alice)
    assert punches_judge(ids=[plausible.pk], suspect=True, reason="x" * fits, user=alice) == 1
    plausible.refresh_from_db()
    assert len(plausible.suspect_reason) == 200


def test_judging_a_queryset_of_punches_is_one_update(punches, alice, django_assert_num_queries):
    ids = RawAttendance.objects.filter(user_id__in=["1001", "1003"]).values_list("pk", flat=True)
    with django_assert_num_queries(1):
        written = punches_judge(ids=ids, suspect=True, reason="door forced", user=alice)
    assert written == 2
    assert set(
        RawAttendance.objects.filter(suspect_override=True).values_list("user_id", flat=True)
    ) == {"1001", "1003"}


def test_processing_skips_a_punch_an_operator_marked_suspect(alice):
    device = DeviceFactory(timezone="UTC")
    clock_in, clock_out = (
        RawAttendanceFactory(
            device=device,
            user_id="1001",
            timestamp=datetime.datetime(2026, 11, 2, hour, 0, tzinfo=UTC),
        )
        for hour in (8, 17)
    )
    attendance_process(full=True)
    day = ProcessedAttendance.objects.get()
    assert (day.punch_count, day.clock_out) == (2, clock_out.timestamp)

    punches_judge(ids=[clock_out.pk], suspect=True, reason="left at noon", user=alice)
    attendance_recompute(ids=[day.pk])
    day.refresh_from_db()
    assert (day.punch_count, day.ignored_suspect_punches, day.clock_out) == (1, 1, None)
    assert day.clock_in == clock_in.timestamp
