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

Generated devices carry arbitrary addresses, so the run keeps every socket on
the loopback interface and caps socket timeouts (``network_guard``): no
request may leave the machine, whatever an endpoint does with a device.
"""

import datetime
import ipaddress
import json
import socket

import pytest
import schemathesis
from django.conf import settings
from django.core import signals
from django.core.wsgi import get_wsgi_application
from django.db import close_old_connections
from django.test import Client
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


@pytest.fixture
def network_guard(monkeypatch):
    """Refuses connections and datagrams to anything but loopback; caps timeouts."""
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex
    real_sendto = socket.socket.sendto
    real_settimeout = socket.socket.settimeout

    def refuse(address):
        raise ConnectionRefusedError(f"the test run keeps to loopback; refused {address!r}")

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _loopback(address):
            refuse(address)
        return real_connect(self, address)

    def connect_ex(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _loopback(address):
            refuse(address)
        return real_connect_ex(self, address)

    def sendto(self, data, *args):
        address = args[-1]
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _loopback(address):
            refuse(address)
        return real_sendto(self, data, *args)

    def settimeout(self, value):
        return real_settimeout(self, SOCKET_TIMEOUT_CAP if value is None else min(value, 1.0))

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    monkeypatch.setattr(socket.socket, "sendto", sendto)
    monkeypatch.setattr(socket.socket, "settimeout", settimeout)


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
    case, superuser_login, network_guard, keep_test_connection
):
    cookies, headers = superuser_login
    response = case.call(headers=headers, cookies=cookies)
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
