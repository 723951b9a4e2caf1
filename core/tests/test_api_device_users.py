"""/api/devices/{id}/users/: the users on a clock, read and written live through
the emulator, and the bulk import from a list or a loopback URL."""

import http.server
import json
import threading
import time

import pytest

from core.models import Employee
from core.tests.factories import DeviceFactory
from core.zk.emulator import DeviceState, UserRecord

pytestmark = pytest.mark.django_db


@pytest.fixture
def operator(api_as):
    return api_as(groups=["Operators"])


@pytest.fixture
def clock(zk_emulator):
    """(emulator, device): a clock holding users 1001 (uid 1) and 1002 (uid 2)."""
    state = DeviceState(
        users=[
            UserRecord(uid=1, user_id="1001", name="Ana", password="123"),
            UserRecord(uid=2, user_id="1002", name="Bruno", card=555),
        ]
    )
    emulator = zk_emulator(state)
    return emulator, DeviceFactory(port=emulator.port)


def on_clock(emulator) -> dict[str, tuple]:
    with emulator.state.lock:
        return {u.user_id: (u.uid, u.name) for u in emulator.state.users}


def test_users_are_read_live_from_the_clock_without_their_passwords(operator, clock):
    emulator, device = clock
    answer = operator.get(f"/api/devices/{device.pk}/users/")
    assert answer.status_code == 200
    body = answer.json()
    assert body["count"] == 2
    ana, bruno = body["results"]
    assert (ana["user_id"], ana["name"], ana["has_password"]) == ("1001", "Ana", True)
    assert "password" not in ana and "123" not in answer.content.decode()
    assert bruno["card"] == 555
    emulator.state.upsert_user(UserRecord(uid=3, user_id="1003", name="Carla"))
    assert operator.get(f"/api/devices/{device.pk}/users/").json()["count"] == 3


def test_adding_a_user_writes_it_to_the_next_free_slot_and_saving_again_updates_it(operator, clock):
    emulator, device = clock
    url = f"/api/devices/{device.pk}/users/"
    added = operator.post(url, {"user_id": "2001", "name": "Diana"}, format="json")
    assert added.status_code == 201, added.content
    assert added.json()["uid"] == 3
    assert on_clock(emulator)["2001"] == (3, "Diana")
    assert Employee.objects.get(user_id="2001").name == "Diana"
    renamed = operator.post(url, {"user_id": "2001", "name": "Diana Rocha"}, format="json")
    assert renamed.status_code == 200 and renamed.json()["uid"] == 3
    assert on_clock(emulator)["2001"] == (3, "Diana Rocha")
    assert len(on_clock(emulator)) == 3


@pytest.mark.parametrize(
    "body, named, says",
    [
        ({"user_id": "1234567890"}, "user_id", "at most 9"),
        ({"user_id": "12 34"}, "user_id", "letters and digits"),
        ({"user_id": "3001", "name": "Ñ" * 13}, "name", "26 bytes"),
        ({"user_id": "3001", "name": "x" * 25}, "name", "at most 24"),
        ({"user_id": "3001", "uid": 2}, "uid", "belongs to user '1002'"),
        ({"user_id": "3001", "privilege": 3}, "privilege", ""),
        ({"name": "Nobody"}, "user_id", "required"),
    ],
)
def test_a_user_that_does_not_fit_the_clock_is_a_400_and_nothing_is_written(
    operator, clock, body, named, says
):
    emulator, device = clock
    answer = operator.post(f"/api/devices/{device.pk}/users/", body, format="json")
    assert answer.status_code == 400
    assert says in json.dumps(answer.json()[named], ensure_ascii=False)
    assert set(on_clock(emulator)) == {"1001", "1002"}


def test_a_name_of_24_bytes_fits(operator, clock):
    emulator, device = clock
    name = "Ñ" * 12
    answer = operator.post(
        f"/api/devices/{device.pk}/users/", {"user_id": "3001", "name": name}, format="json"
    )
    assert answer.status_code == 201
    assert on_clock(emulator)["3001"][1] == name


def test_deleting_a_user_removes_it_from_the_clock_and_a_second_delete_is_a_404(operator, clock):
    emulator, device = clock
    url = f"/api/devices/{device.pk}/users/1002/"
    assert operator.delete(url).status_code == 204
    assert set(on_clock(emulator)) == {"1001"}
    again = operator.delete(url)
    assert again.status_code == 404 and "1002" in again.json()["detail"]


def test_users_of_an_unknown_device_are_a_404(operator):
    assert operator.get("/api/devices/999999/users/").status_code == 404
    assert operator.delete("/api/devices/999999/users/1/").status_code == 404


# --- Import ------------------------------------------------------------------------------


def test_importing_a_list_adds_and_updates_and_importing_it_again_changes_nothing(operator, clock):
    emulator, device = clock
    url = f"/api/devices/{device.pk}/users/import/"
    users = [{"user_id": "1001", "name": "Ana Paula"}, {"user_id": "4001", "name": "Eva"}]
    first = operator.post(url, {"users": users}, format="json")
    assert first.status_code == 200, first.content
    assert first.json() == {"added": 1, "updated": 1, "unchanged": 0}
    assert on_clock(emulator)["1001"] == (1, "Ana Paula")
    assert on_clock(emulator)["4001"] == (3, "Eva")
    again = operator.post(url, {"users": users}, format="json")
    assert again.json() == {"added": 0, "updated": 0, "unchanged": 2}


def test_an_import_with_one_bad_user_writes_nothing_and_names_its_position(operator, clock):
    emulator, device = clock
    users = [{"user_id": "5001", "name": "Fine"}, {"user_id": "5002", "name": "y" * 30}]
    answer = operator.post(
        f"/api/devices/{device.pk}/users/import/", {"users": users}, format="json"
    )
    assert answer.status_code == 400
    assert "name" in answer.json()["users"]["1"]
    assert set(on_clock(emulator)) == {"1001", "1002"}


class Source:
    """A loopback HTTP server whose answer a test sets: (status, body bytes, delay s)."""

    def __init__(self):
        self.answer = (200, b"[]", 0.0)
        source = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                status, body, delay = source.answer
                self.send_response(status)
                if status in (301, 302):
                    self.send_header("Location", "http://127.0.0.1:9/elsewhere")
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                for start in range(0, len(body), 1000):
                    time.sleep(delay)
                    self.wfile.write(body[start : start + 1000])

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/users.json"

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def source(settings):
    settings.USER_IMPORT_ALLOWED_HOSTS = ["127.0.0.1"]
    settings.USER_IMPORT_TIMEOUT_SECONDS = 1
    settings.USER_IMPORT_MAX_BYTES = 10_000
    served = Source()
    yield served
    served.stop()


def test_importing_from_an_allowed_url_writes_its_users(operator, clock, source):
    emulator, device = clock
    source.answer = (200, json.dumps([{"user_id": "6001", "name": "Gil"}]).encode(), 0)
    answer = operator.post(
        f"/api/devices/{device.pk}/users/import/", {"url": source.url}, format="json"
    )
    assert answer.status_code == 200, answer.content
    assert answer.json()["added"] == 1 and on_clock(emulator)["6001"] == (3, "Gil")


@pytest.mark.parametrize(
    "answer, says",
    [
        ((200, b'{"users": []}', 0), "Expected a JSON list of users, got a JSON dict"),
        ((200, b"[1, 2]", 0), "User 0 is not an object"),
        ((200, b'[{"user_id": "1", "shoe_size": 44}]', 0), "unknown fields: shoe_size"),
        ((200, b"<html>", 0), "did not send JSON"),
        ((200, b"[" + b'{"user_id": "1"},' * 2000 + b"{}]", 0), "more than 10000 bytes"),
        ((200, b"[" + b" " * 5000 + b"]", 0.3), "took longer than 1 s"),
        ((404, b"", 0), "answered HTTP 404"),
        ((302, b"", 0), "answered HTTP 302"),
    ],
)
def test_an_import_url_whose_answer_is_not_a_list_of_users_is_a_400_saying_why(
    operator, clock, source, answer, says
):
    emulator, device = clock
    source.answer = answer
    reply = operator.post(
        f"/api/devices/{device.pk}/users/import/", {"url": source.url}, format="json"
    )
    assert reply.status_code == 400
    assert says in reply.json()["url"]
    assert set(on_clock(emulator)) == {"1001", "1002"}


@pytest.mark.parametrize(
    "url, says",
    [
        ("http://localhost:{port}/users.json", "not in USER_IMPORT_ALLOWED_HOSTS"),
        ("ftp://127.0.0.1:{port}/users.json", "Only http and https"),
        ("file:///etc/passwd", ""),
    ],
)
def test_an_import_url_that_is_not_allowed_is_refused_without_fetching(
    operator, clock, source, url, says
):
    _emulator, device = clock
    port = source.server.server_address[1]
    reply = operator.post(
        f"/api/devices/{device.pk}/users/import/",
        {"url": url.format(port=port)},
        format="json",
    )
    assert reply.status_code == 400
    assert says in json.dumps(reply.json()["url"])


def test_an_import_needs_users_or_a_url_not_both(operator, clock, source):
    _emulator, device = clock
    url = f"/api/devices/{device.pk}/users/import/"
    assert operator.post(url, {}, format="json").status_code == 400
    both = {"users": [{"user_id": "1"}], "url": source.url}
    assert operator.post(url, both, format="json").status_code == 400


def test_over_udp_a_clock_takes_numeric_user_ids_and_names_of_8_bytes(operator, clock):
    emulator, _device = clock
    udp = DeviceFactory(port=emulator.port, protocol="udp")
    url = f"/api/devices/{udp.pk}/users/"
    long_name = operator.post(url, {"user_id": "7001", "name": "Gabriela"[:8] + "X"}, format="json")
    assert long_name.status_code == 400 and "at most 8" in long_name.json()["name"]
    letters = operator.post(url, {"user_id": "A7", "name": "Gil"}, format="json")
    assert letters.status_code == 400 and "numeric" in letters.json()["user_id"]
    added = operator.post(url, {"user_id": "7001", "name": "Gabriela"}, format="json")
    assert added.status_code == 201, added.content
    assert on_clock(emulator)["7001"] == (3, "Gabriela")
    listed = operator.get(url).json()["results"]
    assert [u["user_id"] for u in listed] == ["1001", "1002", "7001"]
