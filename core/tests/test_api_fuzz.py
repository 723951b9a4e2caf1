"""A property-based run against the API's own OpenAPI schema (schemathesis).

Requests generated from the schema /api/schema/ serves (drf-spectacular's
generator, run when the module is collected; a test below checks that the
page serves the same operations) go to every operation in it, as an
authenticated superuser (session and CSRF token, which every configuration of
the API accepts), through the WSGI application: no server. Whatever the
request, the answer is never a server error; a 502 or 504 passes only where
the operation documents it (a device that cannot be reached).

Bounded: a fixed number of examples per operation, a deadline per example,
and derandomized so that every run sends the same requests. Operations added
later are picked up from the schema.

Generated devices carry arbitrary addresses, and actions such as poll, test,
sync_time and the users of a device talk to them with ?wait=true, so:

- a generated body's valid device address is replaced by 127.0.0.1
  (``keep_on_loopback``), and no import URL host is allowed;
- ``network_guard`` refuses every connection, datagram and name lookup that
  is not for loopback, whichever code path makes it (the ZK client over TCP
  or UDP, the import URL fetch), and fails the test naming it: an attempt the
  endpoint caught and answered 502 for still fails the run;
- tasks the endpoints queue go to an in-memory broker (``celery_sent``), never
  to a worker.

Tests at the end prove the guard catches each of those paths, against
0.0.0.0 (which, were the guard to miss it, reaches this machine and nothing
else). Another test checks that the run covers every route under /api/.
"""

import datetime
import ipaddress
import json
import re
import socket

import pytest
import schemathesis
from django.conf import settings
from django.core import signals
from django.core.wsgi import get_wsgi_application
from django.db import close_old_connections
from django.test import Client
from django.urls import get_resolver
from drf_spectacular.generators import SchemaGenerator
from drf_spectacular.renderers import OpenApiJsonRenderer
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings

EXAMPLES_PER_OPERATION = 20
DEADLINE = datetime.timedelta(seconds=5)
SOCKET_TIMEOUT_CAP = 1.0
CSRF_SECRET = "f" * 32


def _loopback(address) -> bool:
    host = address[0] if isinstance(address, tuple) else address
    if not isinstance(host, str):
        return True  # an AF_UNIX path
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False  # a name: it would need a lookup that may leave the machine


class NetworkGuard:
    """Keeps every socket of the process on loopback, and remembers what it refused.

    Patches the methods of socket.socket through which a connection or a
    datagram leaves (connect, connect_ex, sendto, sendmsg) and name lookups
    (getaddrinfo, gethostbyname): the ZK client's TCP and UDP sockets, the
    user-import URL fetch (requests), and anything else written in Python.
    A refused attempt raises ConnectionRefusedError (or gaierror) in the code
    that made it, which may well catch it and answer 502; so each attempt is
    also recorded in ``attempts``, and the tests fail on any (``assert_none``,
    and again when the fixture ends). Socket timeouts are capped, so a
    loopback port that never answers costs a second, not a device's timeout.
    """

    def __init__(self):
        self.attempts: list[str] = []

    def refuse(self, what: str, address) -> None:
        self.attempts.append(f"{what} {address!r}")
        raise ConnectionRefusedError(f"the test run keeps to loopback; refused {what} {address!r}")

    def assert_none(self, context: str = "") -> None:
        assert self.attempts == [], (
            f"a request tried to reach an address that is not loopback {context}: {self.attempts}"
        )

    def install(self, monkeypatch) -> None:
        guard = self
        real = socket.socket
        real_connect, real_connect_ex = real.connect, real.connect_ex
        real_sendto, real_sendmsg, real_settimeout = real.sendto, real.sendmsg, real.settimeout
        real_getaddrinfo, real_gethostbyname = socket.getaddrinfo, socket.gethostbyname

        def inet(sock) -> bool:
            return sock.family in (socket.AF_INET, socket.AF_INET6)

        def connect(self, address):
            if inet(self) and not _loopback(address):
                guard.refuse("connect", address)
            return real_connect(self, address)

        def connect_ex(self, address):
            if inet(self) and not _loopback(address):
                guard.refuse("connect_ex", address)
            return real_connect_ex(self, address)

        def sendto(self, data, *args):
            if inet(self) and not _loopback(args[-1]):
                guard.refuse("sendto", args[-1])
            return real_sendto(self, data, *args)

        def sendmsg(self, buffers, *args):
            address = args[2] if len(args) > 2 else None
            if inet(self) and address is not None and not _loopback(address):
                guard.refuse("sendmsg", address)
            return real_sendmsg(self, buffers, *args)

        def settimeout(self, value):
            capped = SOCKET_TIMEOUT_CAP if value is None else min(value, SOCKET_TIMEOUT_CAP)
            return real_settimeout(self, capped)

        def looked_up(host) -> bool:
            if host is None or _loopback(host):
                return True
            try:
                ipaddress.ip_address(str(host).split("%")[0])
            except ValueError:
                guard.attempts.append(f"lookup {host!r}")
                return False
            return True  # an address needs no lookup; connect() decides

        def getaddrinfo(host, *args, **kwargs):
            if not looked_up(host):
                raise socket.gaierror(socket.EAI_NONAME, f"the test run looks up no name: {host!r}")
            return real_getaddrinfo(host, *args, **kwargs)

        def gethostbyname(host):
            if not looked_up(host):
                raise socket.gaierror(socket.EAI_NONAME, f"the test run looks up no name: {host!r}")
            return real_gethostbyname(host)

        monkeypatch.setattr(real, "connect", connect)
        monkeypatch.setattr(real, "connect_ex", connect_ex)
        monkeypatch.setattr(real, "sendto", sendto)
        monkeypatch.setattr(real, "sendmsg", sendmsg)
        monkeypatch.setattr(real, "settimeout", settimeout)
        monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
        monkeypatch.setattr(socket, "gethostbyname", gethostbyname)


@pytest.fixture
def network_guard(monkeypatch):
    """A NetworkGuard installed for the test; the test fails if anything was refused
    and the test did not take the record (``attempts.clear()``) itself."""
    guard = NetworkGuard()
    guard.install(monkeypatch)
    yield guard
    guard.assert_none("(found when the test ended)")


@pytest.fixture
def loopback_only_settings(settings):
    """No import host allowed, whatever the environment says: an import URL is
    refused before any fetch (the guard still stands behind it)."""
    settings.USER_IMPORT_ALLOWED_HOSTS = []


def keep_on_loopback(body) -> None:
    """A generated device's address, when it is a valid one, becomes 127.0.0.1:
    a run may then poll it with ?wait=true. Invalid values stay, for the 400s."""
    if not isinstance(body, dict) or not isinstance(body.get("ip_address"), str):
        return
    try:
        ipaddress.ip_address(body["ip_address"])
    except ValueError:
        return
    body["ip_address"] = "127.0.0.1"


@pytest.fixture
def keep_test_connection():
    """The WSGI handler closes the database connection after each request, as in
    production; the test's transaction lives on it, so keep it (as Django's test
    client does)."""
    signals.request_started.disconnect(close_old_connections)
    signals.request_finished.disconnect(close_old_connections)
    yield
    signals.request_started.connect(close_old_connections)
    signals.request_finished.connect(close_old_connections)


@pytest.fixture
def superuser_login(db, django_user_model):
    """The cookies and header of a superuser's session, with its CSRF token."""
    user = django_user_model.objects.create_superuser("root", "root@example.com", "pw")
    client = Client()
    client.force_login(user)
    cookies = {
        settings.SESSION_COOKIE_NAME: client.cookies[settings.SESSION_COOKIE_NAME].value,
        settings.CSRF_COOKIE_NAME: CSRF_SECRET,
    }
    return cookies, {"X-CSRFToken": CSRF_SECRET}


def _generated_schema() -> dict:
    return json.loads(OpenApiJsonRenderer().render(SchemaGenerator().get_schema(public=True)))


# Built at collection, so that each operation is a test of its own. (Loading it
# from a fixture, schemathesis.pytest.from_fixture, fails on pytest 9.)
RAW_SCHEMA = _generated_schema()
# The schema document itself is left out of the generated run: its only
# inputs are two enumerations (format, lang), and each request rebuilds the
# whole schema, which would make it most of the run's time. The test below
# requests it in each format.
schema = schemathesis.openapi.from_dict(RAW_SCHEMA).exclude(path=["/api/schema/"])
schema.app = get_wsgi_application()


@pytest.mark.django_db
def test_the_fuzzed_schema_is_the_one_the_api_serves_in_each_format(superuser_login):
    cookies, headers = superuser_login
    client = Client(headers=headers)
    client.cookies.load(cookies)
    response = client.get("/api/schema/", {"format": "json"})
    assert response.status_code == 200
    assert response.json()["paths"] == RAW_SCHEMA["paths"]
    german = client.get("/api/schema/", {"format": "json", "lang": "de"})
    assert german.status_code == 200
    assert set(german.json()["paths"]) == set(RAW_SCHEMA["paths"])
    yaml = client.get("/api/schema/", {"format": "yaml"})
    assert yaml.status_code == 200
    assert "/api/reports/timesheet/:" in yaml.content.decode()
    assert client.get("/api/schema/", {"format": "xml"}).status_code == 404


@schema.parametrize()
@hypothesis_settings(
    max_examples=EXAMPLES_PER_OPERATION,
    deadline=DEADLINE,
    derandomize=True,
    database=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
    ],
)
def test_generated_requests_get_no_server_error(
    case, superuser_login, network_guard, loopback_only_settings, celery_sent, keep_test_connection
):
    cookies, headers = superuser_login
    keep_on_loopback(case.body)
    response = case.call(headers=headers, cookies=cookies)
    network_guard.assert_none(f"({case.method} {case.formatted_path} body={case.body!r})")
    status = response.status_code
    # A superuser may do everything: a refusal means the run lost its login,
    # and would test nothing beyond the permission check.
    assert status not in (401, 403), f"{case.method} {case.formatted_path}: {response.text[:300]}"
    documented = {str(code) for code in case.operation.definition.raw.get("responses", {})}
    allowed = status in (502, 504) and str(status) in documented
    assert status < 500 or allowed, (
        f"{case.method} {case.formatted_path} query={case.query} body={case.body!r} "
        f"answered {status}: {response.text[:500]}"
    )


# --- The run covers the whole API, and its guard holds ------------------------------------


def _routes(patterns, prefix: str = "") -> set[str]:
    found = set()
    for entry in patterns:
        route = prefix + str(entry.pattern).lstrip("^").rstrip("$")
        if hasattr(entry, "url_patterns"):
            found |= _routes(entry.url_patterns, route)
        elif "format>" not in route:  # the router's .json twins of each route
            found.add(route)
    return found


def _shape(path: str) -> str:
    """A route with its parameters unnamed: devices/<int:pk>/ and devices/{id}/ agree."""
    path = re.sub(r"\(\?P<\w+>[^)]*\)", "{}", path)
    path = re.sub(r"<(?:\w+:)?\w+>", "{}", path)
    return "/" + re.sub(r"\{\w+\}", "{}", path).lstrip("/")


def test_the_run_covers_every_route_of_the_api():
    routes = {_shape(r) for r in _routes(get_resolver().url_patterns) if r.startswith("api/")}
    # The browsable API's front page is a page of links, and the Swagger UI and
    # ReDoc pages render the schema: no operations (the permissions matrix
    # covers who may open them).
    routes -= {"/api/", "/api/docs/", "/api/redoc/"}
    documented = {_shape(path) for path in RAW_SCHEMA["paths"]}
    assert routes == documented
    run = {_shape(path) for path in RAW_SCHEMA["paths"] if path != "/api/schema/"}
    assert run == documented - {"/api/schema/"}
    for path in ("/api/reports/timesheet/", "/api/audit-log/", "/api/devices/{}/users/import/"):
        assert path in run


@pytest.fixture
def far_device():
    """A device at 0.0.0.0: not loopback to the guard, and were the guard to let
    a packet through, it would reach this machine and nothing else."""
    from core.tests.factories import DeviceFactory

    def make(protocol: str = "tcp"):
        return DeviceFactory(ip_address="0.0.0.0", port=4370, protocol=protocol)

    return make


@pytest.mark.django_db
@pytest.mark.parametrize("protocol", ["tcp", "udp"])
@pytest.mark.parametrize(
    "method, path",
    [
        ("post", "test/?wait=true"),
        ("post", "poll/?wait=true"),
        ("post", "sync_time/?wait=true"),
        ("get", "users/"),
        ("post", "users/"),
        ("delete", "users/1001/"),
        ("post", "users/import/"),
    ],
)
def test_the_guard_refuses_and_records_a_device_action_aimed_off_loopback(
    network_guard, far_device, api_as, celery_sent, method, path, protocol
):
    client = api_as()
    client.user.is_superuser = True
    client.user.save()
    device = far_device(protocol)
    body = {"users": [{"user_id": "1001"}]} if path == "users/import/" else {"user_id": "1001"}
    answer = getattr(client, method)(f"/api/devices/{device.pk}/{path}", body, format="json")
    # The endpoint saw an unreachable device, and the guard saw the attempt.
    assert answer.status_code in (502, 504)
    verb = "connect" if protocol == "tcp" else "sendto"
    assert network_guard.attempts and all(
        attempt.startswith(verb) and "'0.0.0.0'" in attempt for attempt in network_guard.attempts
    )
    with pytest.raises(AssertionError, match="not loopback"):
        network_guard.assert_none()
    network_guard.attempts.clear()


@pytest.mark.django_db
def test_the_guard_refuses_and_records_an_import_url_aimed_off_loopback(
    network_guard, far_device, api_as, settings
):
    settings.USER_IMPORT_ALLOWED_HOSTS = ["0.0.0.0"]
    settings.USER_IMPORT_TIMEOUT_SECONDS = 1
    client = api_as()
    client.user.is_superuser = True
    client.user.save()
    device = far_device()
    answer = client.post(
        f"/api/devices/{device.pk}/users/import/",
        {"url": "http://0.0.0.0:9/users.json"},
        format="json",
    )
    assert answer.status_code == 400 and "could not be fetched" in answer.json()["url"]
    assert network_guard.attempts == ["connect ('0.0.0.0', 9)"]
    network_guard.attempts.clear()


def test_the_guard_refuses_and_records_a_name_lookup(network_guard):
    with pytest.raises(socket.gaierror):
        socket.getaddrinfo("users.example.invalid", 443)
    assert network_guard.attempts == ["lookup 'users.example.invalid'"]
    network_guard.attempts.clear()
    assert socket.getaddrinfo("127.0.0.1", 80)
