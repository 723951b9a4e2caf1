"""/api/devices/{id}/commands/: the commands queued for a pushing clock read
back, with what the clock answered; a command whose time is up reads as
failed whether or not any clock polls again."""

import datetime

import pytest
import time_machine

from core import adms
from core.models import DeviceCommand
from core.tests.factories import DeviceFactory

pytestmark = pytest.mark.django_db

UTC = datetime.UTC
SN = "PUSH0001"
NOW = datetime.datetime(2026, 11, 23, 9, 0, tzinfo=UTC)


@pytest.fixture(autouse=True)
def frozen():
    with time_machine.travel(NOW, tick=False) as traveller:
        yield traveller


@pytest.fixture
def operator(api_as):
    return api_as(groups=["Operators"])


def pushing_clock(name="Gate", serial=SN):
    """An approved clock that has called the bridge."""
    return DeviceFactory(
        name=name, ip_address=None, serial_number=serial, first_seen_at=NOW, last_seen_at=NOW
    )


@pytest.fixture
def pushing():
    return pushing_clock()


def queue(device, kind, **values):
    return adms.device_command_queue(device=device, command=adms.command_text(kind, **values))


def test_a_command_queued_through_the_api_is_read_back_with_the_clocks_answer(
    operator, pushing, push_clock
):
    url = f"/api/devices/{pushing.pk}/users/"
    [command_id] = operator.post(
        url, {"user_id": "2001", "name": "Eva", "password": "4242"}, format="json"
    ).json()["command_ids"]
    read = f"/api/devices/{pushing.pk}/commands/{command_id}/"

    queued = operator.get(read)
    assert queued.status_code == 200, queued.content
    assert queued.json() == {
        "id": command_id,
        "command": "DATA UPDATE USERINFO PIN=2001\tName=Eva\tPri=0\tPasswd=***\tCard=\tGrp=1"
        "\tTZ=0000000000000000\tVerify=0\tViceCard=",
        "state": "queued",
        "return_code": None,
        "result": "",
        "created_by": operator.user.username,
        "created_at": "2026-11-23T09:00:00Z",
        "sent_at": None,
        "answered_at": None,
    }
    assert "4242" not in queued.content.decode()

    assert f"C:{command_id}:DATA UPDATE USERINFO" in push_clock(pushing).polls()
    assert operator.get(read).json()["state"] == "sent"
    push_clock(pushing).reports(f"ID={command_id}&Return=0&CMD=DATA\n")
    done = operator.get(read).json()
    assert (done["state"], done["return_code"]) == ("done", 0)
    assert done["sent_at"] == done["answered_at"] == "2026-11-23T09:00:00Z"


def test_the_list_is_newest_first_paged_and_holds_only_this_devices_commands(
    operator, pushing, frozen
):
    other = pushing_clock("Other", "PUSH0002")
    first = queue(pushing, "info")
    frozen.shift(datetime.timedelta(minutes=1))
    queue(other, "reboot")
    second, third = queue(pushing, "check"), queue(pushing, "reboot")

    answer = operator.get(f"/api/devices/{pushing.pk}/commands/", {"limit": 2})
    assert answer.status_code == 200, answer.content
    body = answer.json()
    assert body["count"] == 3 and body["next"]
    assert [c["id"] for c in body["results"]] == [third.pk, second.pk]
    rest = operator.get(f"/api/devices/{pushing.pk}/commands/", {"limit": 2, "offset": 2})
    assert [c["id"] for c in rest.json()["results"]] == [first.pk]


def test_the_list_filters_by_state(operator, pushing, push_clock):
    info, check, reboot = queue(pushing, "info"), queue(pushing, "check"), queue(pushing, "reboot")
    push_clock(pushing).polls()
    push_clock(pushing).reports(
        f"ID={info.pk}&Return=0&CMD=INFO\nID={check.pk}&Return=-1&CMD=CHECK\n"
    )
    waiting = queue(pushing, "info")
    url = f"/api/devices/{pushing.pk}/commands/"

    def ids(state):
        answer = operator.get(url, {"state": state})
        assert answer.status_code == 200, answer.content
        return [c["id"] for c in answer.json()["results"]]

    assert ids("done") == [info.pk]
    assert ids("failed") == [check.pk]
    assert ids("sent") == [reboot.pk]
    assert ids("queued") == [waiting.pk]
    refused = operator.get(url, {"state": "lost"})
    assert refused.status_code == 400
    assert "state" in refused.json()


def test_another_devices_command_is_a_404(operator, pushing):
    other = pushing_clock("Other", "PUSH0002")
    theirs = queue(other, "info")
    answer = operator.get(f"/api/devices/{pushing.pk}/commands/{theirs.pk}/")
    assert answer.status_code == 404
    assert operator.get(f"/api/devices/{other.pk}/commands/{theirs.pk}/").status_code == 200


def test_an_unknown_device_is_a_404_not_an_empty_list(operator, pushing):
    missing = pushing.pk + 1000
    assert operator.get(f"/api/devices/{missing}/commands/").status_code == 404


def test_a_command_unanswered_past_the_timeout_reads_as_failed_without_another_poll(
    operator, pushing, frozen, settings, push_clock
):
    late = queue(pushing, "info")
    push_clock(pushing).polls()
    frozen.shift(settings.ADMS_COMMAND_TIMEOUT - datetime.timedelta(minutes=1))
    recent = queue(pushing, "check")
    push_clock(pushing).polls()
    # The clock goes silent: no poll from here on, of it or any other clock.
    frozen.shift(datetime.timedelta(minutes=2))
    url = f"/api/devices/{pushing.pk}/commands/"

    expired = operator.get(f"{url}{late.pk}/").json()
    assert expired["state"] == "failed"
    assert expired["result"] == f"no result within {settings.ADMS_COMMAND_TIMEOUT}"
    assert expired["answered_at"] is None and expired["return_code"] is None
    # Sent a minute ago: still waiting.
    listed = {c["id"]: c["state"] for c in operator.get(url).json()["results"]}
    assert listed == {late.pk: "failed", recent.pk: "sent"}
    assert [c["id"] for c in operator.get(url, {"state": "sent"}).json()["results"]] == [recent.pk]
    assert [c["id"] for c in operator.get(url, {"state": "failed"}).json()["results"]] == [late.pk]
    # A result that comes after all is still booked.
    push_clock(pushing).reports(f"ID={late.pk}&Return=0&CMD=INFO\n")
    assert operator.get(f"{url}{late.pk}/").json()["state"] == "done"


def test_a_queued_command_never_handed_over_does_not_time_out(operator, pushing, frozen, settings):
    command = queue(pushing, "info")
    frozen.shift(settings.ADMS_COMMAND_TIMEOUT * 3)
    answer = operator.get(f"/api/devices/{pushing.pk}/commands/{command.pk}/").json()
    assert answer["state"] == "queued"
    assert DeviceCommand.objects.get().state == DeviceCommand.State.QUEUED
