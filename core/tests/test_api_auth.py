"""Logging in to the API (session, token, JWT, Basic only when a setting allows
it), request limits, and the schema and docs pages."""

import base64

import pytest
from django.core.management import call_command
from rest_framework.test import APIClient

pytestmark = pytest.mark.django_db


@pytest.fixture
def hr_user(django_user_model):
    from django.contrib.auth.models import Group

    user = django_user_model.objects.create_user("hanna", password="s3cret-pass")
    user.groups.add(Group.objects.get(name="HR"))
    return user


def test_a_token_from_username_and_password_opens_the_api(hr_user):
    client = APIClient()
    answer = client.post(
        "/api/auth/token/", {"username": "hanna", "password": "s3cret-pass"}, format="json"
    )
    assert answer.status_code == 200
    token = answer.json()["token"]
    assert client.get("/api/employees/").status_code == 401
    client.credentials(HTTP_AUTHORIZATION=f"Token {token}")
    assert client.get("/api/employees/").status_code == 200


def test_a_wrong_password_gets_no_token(hr_user):
    answer = APIClient().post(
        "/api/auth/token/", {"username": "hanna", "password": "guess"}, format="json"
    )
    assert answer.status_code == 400 and "token" not in answer.json()


def test_a_jwt_pair_opens_the_api_and_its_refresh_token_gives_a_new_access_token(hr_user):
    client = APIClient()
    pair = client.post(
        "/api/auth/jwt/", {"username": "hanna", "password": "s3cret-pass"}, format="json"
    ).json()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {pair['access']}")
    assert client.get("/api/employees/").status_code == 200
    refreshed = APIClient().post("/api/auth/jwt/refresh/", {"refresh": pair["refresh"]})
    assert refreshed.status_code == 200 and refreshed.json()["access"]
    client.credentials(HTTP_AUTHORIZATION="Bearer not-a-jwt")
    assert client.get("/api/employees/").status_code == 401


def test_a_session_login_opens_the_api(client, hr_user):
    client.force_login(hr_user)
    assert client.get("/api/employees/").status_code == 200


def basic(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


def test_http_basic_is_refused_unless_api_basic_auth_is_on(hr_user, settings):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=basic("hanna", "s3cret-pass"))
    assert client.get("/api/employees/").status_code == 401
    settings.API_BASIC_AUTH = True
    assert client.get("/api/employees/").status_code == 200
    client.credentials(HTTP_AUTHORIZATION=basic("hanna", "wrong"))
    assert client.get("/api/employees/").status_code == 401


def test_the_login_endpoints_are_limited_by_api_auth_throttle_rate(hr_user, settings):
    settings.API_AUTH_THROTTLE_RATE = "3/minute"
    client = APIClient()
    wrong = {"username": "hanna", "password": "guess"}
    codes = [client.post("/api/auth/token/", wrong, format="json").status_code for _ in range(4)]
    assert codes == [400, 400, 400, 429]
    right = {"username": "hanna", "password": "s3cret-pass"}
    assert client.post("/api/auth/jwt/", right, format="json").status_code == 429


def guess_with(forwarded: str) -> int:
    """A wrong password from a new client, with this X-Forwarded-For; the status code."""
    wrong = {"username": "hanna", "password": "guess"}
    client = APIClient()
    return client.post(
        "/api/auth/token/", wrong, format="json", HTTP_X_FORWARDED_FOR=forwarded
    ).status_code


def test_a_made_up_x_forwarded_for_does_not_get_a_guesser_new_tries(hr_user, settings):
    settings.API_AUTH_THROTTLE_RATE = "3/minute"
    # No proxy in front: the header is the client's own, and is not read.
    assert [guess_with(f"10.0.0.{n}") for n in range(4)] == [400, 400, 400, 429]


def test_behind_a_proxy_the_limit_counts_the_address_the_proxy_saw(hr_user, settings):
    settings.API_AUTH_THROTTLE_RATE = "3/minute"
    settings.API_NUM_PROXIES = 1
    # The proxy appends the address it saw; what the client sent before it is
    # not believed, so varying it gets no new tries.
    assert [guess_with(f"10.0.0.{n}, 203.0.113.7") for n in range(4)] == [400, 400, 400, 429]
    # Another client behind the same proxy has its own count.
    assert guess_with("198.51.100.9") == 400


def test_the_api_is_limited_per_user_by_api_throttle_rate(api_as, settings):
    settings.API_THROTTLE_RATE = "2/minute"
    hr = api_as(groups=["HR"])
    codes = [hr.get("/api/employees/").status_code for _ in range(3)]
    assert codes == [200, 200, 429]
    assert api_as(groups=["HR"]).get("/api/employees/").status_code == 200


@pytest.mark.parametrize("path", ["/api/schema/", "/api/docs/", "/api/redoc/"])
def test_the_schema_and_docs_pages_need_a_login(api_as, path):
    assert api_as(anonymous=True).get(path).status_code == 401
    answer = api_as(groups=["CRM"]).get(path)
    assert answer.status_code == 200


def test_the_docs_pages_load_their_scripts_from_the_bridge_not_a_cdn(api_as):
    page = api_as(groups=["CRM"]).get("/api/docs/").content.decode()
    assert "/static/drf_spectacular_sidecar/" in page and "cdn" not in page.lower()


def test_the_schema_generates_without_warnings_and_validates(tmp_path):
    out = tmp_path / "schema.yml"
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(out))
    text = out.read_text()
    for path in (
        "/api/devices/{id}/poll/",
        "/api/devices/{device_pk}/users/import/",
        "/api/processed-attendance/changes/",
        "/api/raw-attendance/",
        "/api/auth/jwt/refresh/",
    ):
        assert f"  {path}:" in text
    assert "'504':" in text and "'404':" in text and "start_date" in text
