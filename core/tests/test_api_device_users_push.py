"""/api/devices/{id}/users/ for a clock that pushes (core.adms): writes queue
DATA UPDATE/DELETE USERINFO commands that the clock receives at its next
GET /iclock/getrequest, and reads give the bridge's copy of its users."""

import pytest
from auditlog.models import LogEntry
from django.utils import timezone

from core.ingest import employees_store
from core.models import DeviceCommand, Employee
from core.tests.factories import DeviceFactory
from core.zk.client import DeviceUser

pytestmark = pytest.mark.django_db

SN = "PUSH0001"


@pytest.fixture
def operator(api_as):
    return api_as(groups=["Operators"])


@pytest.fixture
def pushing():
    """An approved clock that has called the bridge, knowing user 1001 from its uploads."""
    device = DeviceFactory(
        name="Gate",
        ip_address=None,
        serial_number=SN,
        first_seen_at=timezone.now(),
        last_seen_at=timezone.now(),
    )
    employees_store(
        device=device,
        users=[DeviceUser(1, "1001", "Ana", 0, "", 555, "")],
    )
    return device


def test_adding_a_user_queues_the_command_the_clock_receives_at_its_next_poll(
    operator, pushing, push_clock
):
    answer = operator.post(
        f"/api/devices/{pushing.pk}/users/",
        {"user_id": "2001", "name": "Diana", "privilege": 14, "card": 77, "password": "42"},
        format="json",
    )
    assert answer.status_code == 202, answer.content
    body = answer.json()
    [command_id] = body["command_ids"]
    command = DeviceCommand.objects.get(pk=command_id)
    assert command.device == pushing and command.state == DeviceCommand.State.QUEUED
    assert command.created_by == operator.user.username
    assert push_clock(pushing).polls() == (
        f"C:{command_id}:DATA UPDATE USERINFO PIN=2001\tName=Diana\tPri=14\tPasswd=42\t"
        "Card=77\tGrp=1\tTZ=0000000000000000\tVerify=0\tViceCard=\n"
    )
    # The answer does not repeat the password.
    assert body["commands"] == [command.command.replace("Passwd=42", "Passwd=***")]
    command.refresh_from_db()
    assert command.state == DeviceCommand.State.SENT
    assert push_clock(pushing).polls() == "OK"


def test_deleting_a_user_queues_data_delete_userinfo(operator, pushing, push_clock):
    answer = operator.delete(f"/api/devices/{pushing.pk}/users/1001/")
    assert answer.status_code == 202, answer.content
    [command_id] = answer.json()["command_ids"]
    assert push_clock(pushing).polls() == f"C:{command_id}:DATA DELETE USERINFO PIN=1001\n"


def test_an_import_queues_one_command_per_user_in_list_order(operator, pushing, push_clock):
    users = [{"user_id": "3002", "name": "Cy"}, {"user_id": "3001", "name": "Di", "group_id": "2"}]
    answer = operator.post(
        f"/api/devices/{pushing.pk}/users/import/", {"users": users}, format="json"
    )
    assert answer.status_code == 202, answer.content
    first, second = answer.json()["command_ids"]
    lines = push_clock(pushing).polls().splitlines()
    assert [line.split("\t")[0] for line in lines] == [
        f"C:{first}:DATA UPDATE USERINFO PIN=3002",
        f"C:{second}:DATA UPDATE USERINFO PIN=3001",
    ]
    assert "\tGrp=2\t" in lines[1]


def test_listing_gives_the_bridges_copy_and_says_so(operator, pushing):
    answer = operator.get(f"/api/devices/{pushing.pk}/users/")
    assert answer.status_code == 200
    body = answer.json()
    assert body["source"] == "bridge" and body["count"] == 1
    assert body["results"] == [
        {
            "uid": None,
            "user_id": "1001",
            "name": "Ana",
            "privilege": 0,
            "has_password": None,
            "card": 555,
            "group_id": None,
        }
    ]
    # Other clocks' users are not this clock's.
    other = DeviceFactory(ip_address=None, serial_number="OTHER", first_seen_at=timezone.now())
    employees_store(device=other, users=[DeviceUser(1, "9001", "Zed", 0, "", 0, "")])
    assert operator.get(f"/api/devices/{pushing.pk}/users/").json()["count"] == 1


@pytest.mark.parametrize(
    "body, named, says",
    [
        ({"user_id": "3001", "name": "x" * 25}, "name", "at most 24"),
        ({"user_id": "3001", "name": "Ñ" * 13}, "name", "26 bytes"),
        ({"user_id": "12 34"}, "user_id", "letters and digits"),
        ({"user_id": "3001", "uid": 4}, "uid", "leave uid out"),
        ({"user_id": "3001", "group_id": "A"}, "group_id", "a number"),
        ({"user_id": "3001", "group_id": "0"}, "group_id", "from 1 to 99"),
        ({"user_id": "3001", "password": "abc"}, "password", "digits only"),
        ({"user_id": "3001", "name": "Tab\there"}, "command", "plain text on one line"),
    ],
)
def test_a_user_that_does_not_fit_is_a_400_and_queues_nothing(operator, pushing, body, named, says):
    answer = operator.post(f"/api/devices/{pushing.pk}/users/", body, format="json")
    assert answer.status_code == 400, answer.content
    assert says in str(answer.json()[named])
    assert not DeviceCommand.objects.exists()


def test_the_pin_width_the_clock_reported_limits_user_ids(operator, pushing):
    pushing.push_options = {"~PIN2Width": "5"}
    pushing.save()
    url = f"/api/devices/{pushing.pk}/users/"
    long_id = operator.post(url, {"user_id": "123456"}, format="json")
    assert long_id.status_code == 400 and "at most 5" in long_id.json()["user_id"]
    assert operator.post(url, {"user_id": "12345"}, format="json").status_code == 202


def test_an_import_with_one_bad_user_queues_nothing_and_names_its_position(operator, pushing):
    users = [{"user_id": "5001"}, {"user_id": "5002", "name": "y" * 30}]
    answer = operator.post(
        f"/api/devices/{pushing.pk}/users/import/", {"users": users}, format="json"
    )
    assert answer.status_code == 400
    assert "name" in answer.json()["users"]["1"]
    assert not DeviceCommand.objects.exists()


def test_a_device_that_never_pushed_is_a_409_that_says_why(operator):
    silent = DeviceFactory(name="Silent", ip_address=None, serial_number="NEVER")
    answer = operator.post(f"/api/devices/{silent.pk}/users/", {"user_id": "1"}, format="json")
    assert answer.status_code == 409
    assert "never called this server" in answer.json()["detail"]
    assert operator.delete(f"/api/devices/{silent.pk}/users/1/").status_code == 409
    assert not DeviceCommand.objects.exists()


def test_a_clock_waiting_for_approval_is_a_409(operator, pushing):
    pushing.enabled = False
    pushing.save()
    answer = operator.post(f"/api/devices/{pushing.pk}/users/", {"user_id": "1"}, format="json")
    assert answer.status_code == 409 and "approval" in answer.json()["detail"]
    assert not DeviceCommand.objects.exists()


@pytest.mark.parametrize(
    "method, path, body",
    [
        ("get", "", None),
        ("post", "", {"user_id": "2001"}),
        ("delete", "1001/", None),
        ("post", "import/", {"users": [{"user_id": "2001"}]}),
    ],
)
@pytest.mark.parametrize(
    "who", [{"groups": ["HR"]}, {"perms": ["core.view_device"]}, {"anonymous": True}]
)
def test_without_manage_device_users_nothing_is_read_or_queued(
    api_as, pushing, method, path, body, who
):
    client = api_as(**who)
    answer = getattr(client, method)(f"/api/devices/{pushing.pk}/users/{path}", body, format="json")
    assert answer.status_code == (401 if who.get("anonymous") else 403)
    assert not DeviceCommand.objects.exists()


def test_queued_writes_are_audited_with_their_command_ids(operator, pushing):
    url = f"/api/devices/{pushing.pk}/users/"
    renamed = operator.post(url, {"user_id": "1001", "name": "Ana Paula"}, format="json")
    removed = operator.delete(f"{url}1001/")
    [add_id], [remove_id] = renamed.json()["command_ids"], removed.json()["command_ids"]
    add = LogEntry.objects.get(additional_data__action="device_user_add")
    assert add.actor == operator.user and add.object_pk == str(pushing.pk)
    assert add.additional_data == {"action": "device_user_add", "command_id": add_id}
    # Every field is sent: the card left out is sent empty, as for a polled clock.
    line = DeviceCommand.objects.get(pk=add_id).command
    assert add.changes == {
        "name": ["Ana", "Ana Paula"],
        "card": [555, 0],
        "command": [None, line],
    }
    remove = LogEntry.objects.get(additional_data__action="device_user_remove")
    assert remove.additional_data["command_id"] == remove_id
    assert remove.changes["user_id"] == ["1001", None]


def test_a_polled_clock_that_also_pushes_is_still_written_live(operator, zk_emulator):
    emulator = zk_emulator()
    device = DeviceFactory(port=emulator.port, first_seen_at=timezone.now())
    answer = operator.post(f"/api/devices/{device.pk}/users/", {"user_id": "42"}, format="json")
    assert answer.status_code == 201, answer.content
    assert operator.get(f"/api/devices/{device.pk}/users/").json()["source"] == "device"
    assert not DeviceCommand.objects.exists()


def test_the_bridges_copy_follows_the_commands_the_clock_carried_out(operator, pushing, push_clock):
    url = f"/api/devices/{pushing.pk}/users/"
    [added] = operator.post(url, {"user_id": "2001", "name": "Eva"}, format="json").json()[
        "command_ids"
    ]
    [removed] = operator.delete(f"{url}1001/").json()["command_ids"]
    [refused] = operator.post(url, {"user_id": "2002", "name": "Fay"}, format="json").json()[
        "command_ids"
    ]
    push_clock(pushing).polls()
    # Queued or sent is not done: the copy is unchanged.
    assert [u["user_id"] for u in operator.get(url).json()["results"]] == ["1001"]
    push_clock(pushing).reports(
        f"ID={added}&Return=0&CMD=DATA\nID={removed}&Return=0&CMD=DATA\n"
        f"ID={refused}&Return=-1&CMD=DATA\n"
    )
    listed = operator.get(url).json()["results"]
    assert [(u["user_id"], u["name"]) for u in listed] == [("2001", "Eva")]
    assert DeviceCommand.objects.get(pk=refused).state == DeviceCommand.State.FAILED
    # The employee deleted from the clock stays, with their history.
    assert pushing.employees.filter(user_id="1001").count() == 0
    assert Employee.objects.filter(user_id="1001").exists()
