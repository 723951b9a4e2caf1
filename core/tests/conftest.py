import pytest

from core.fake_crm import FakeCrm
from core.zk.emulator import DeviceState, ZKEmulator


@pytest.fixture(autouse=True)
def fast_password_hashing(settings):
    """Test logins need no slow hash: each PBKDF2 hash costs the suite about a second."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def zk_emulator():
    """Starts ZK device emulators on free loopback ports; stops them after the test.

    ``zk_emulator(state, **options)`` returns a running ZKEmulator; without a state
    it serves 10 generated users and 300 punches.
    """
    running = []

    def start(state: DeviceState | None = None, **options) -> ZKEmulator:
        if state is None:
            state = DeviceState.generate(users=10, punches=300, days=20, seed=11)
        emulator = ZKEmulator(state, host="127.0.0.1", port=0, **options).start()
        running.append(emulator)
        return emulator

    yield start
    for emulator in running:
        emulator.stop()


@pytest.fixture
def fake_crm():
    """Starts fake CRMs on free loopback ports; stops them after the test.

    ``fake_crm(**options)`` returns a running FakeCrm (options as its constructor's).
    """
    running = []

    def start(**options) -> FakeCrm:
        crm = FakeCrm(host="127.0.0.1", port=0, **options).start()
        running.append(crm)
        return crm

    yield start
    for crm in running:
        crm.stop()


class PushClock:
    """A pushing clock's requests to the receiver (/iclock/), as the clock
    sends them; each answer is checked to be one the clock acts on."""

    def __init__(self, serial: str):
        from django.test import Client

        self.serial = serial
        self.client = Client(REMOTE_ADDR="10.0.0.50")

    def polls(self) -> str:
        """GET getrequest: the commands the clock receives, or OK."""
        answer = self.client.get("/iclock/getrequest", {"SN": self.serial})
        assert answer.status_code == 200
        return answer.content.decode()

    def reports(self, body: str) -> None:
        """POST devicecmd: the results of commands, one `ID=..&Return=..&CMD=..` a line."""
        answer = self.client.post(
            f"/iclock/devicecmd?SN={self.serial}", data=body.encode(), content_type="text/plain"
        )
        assert answer.status_code == 200 and answer.content == b"OK"


@pytest.fixture
def push_clock():
    """``push_clock(device)``: a PushClock calling as that device's serial number."""
    return lambda device: PushClock(device.serial_number)


# --- REST API ----------------------------------------------------------------------------


@pytest.fixture(autouse=True, scope="session")
def private_cache(tmp_path_factory):
    """The suite's cache is a folder of its own, whatever CACHE_URL says: clearing it
    (below) never touches the cache of a bridge running from this checkout."""
    from django.test import override_settings

    backend = "django.core.cache.backends.filebased.FileBasedCache"
    location = tmp_path_factory.mktemp("cache")
    with override_settings(CACHES={"default": {"BACKEND": backend, "LOCATION": location}}):
        yield


@pytest.fixture(autouse=True)
def fresh_throttle_counts(private_cache):
    """Request counts (core.api.throttling) live in the cache: each test starts at zero."""
    from django.core.cache import cache

    cache.clear()
    yield
    cache.clear()


@pytest.fixture
def api_as(django_user_model):
    """``api_as(groups=("HR",), perms=("core.view_device",))``: an APIClient logged in as a
    new user in these groups with these permissions; ``api_as(None)`` is anonymous."""
    from django.contrib.auth.models import Group, Permission
    from rest_framework.test import APIClient

    count = iter(range(1, 1000))

    def login(groups=(), perms=(), *, anonymous: bool = False) -> APIClient:
        client = APIClient()
        if anonymous:
            return client
        user = django_user_model.objects.create_user(f"user{next(count)}")
        user.groups.add(*Group.objects.filter(name__in=groups))
        for perm in perms:
            app_label, codename = perm.split(".")
            user.user_permissions.add(
                Permission.objects.get(content_type__app_label=app_label, codename=codename)
            )
        client.force_authenticate(user)
        client.user = user
        return client

    return login


@pytest.fixture
def celery_sent():
    """Tasks the code enqueues go to an in-memory broker; the list holds
    (task name, args, kwargs, task id) of each one published."""
    from celery.signals import after_task_publish

    from attendance_bridge.celery import app

    sent = []

    def record(sender=None, headers=None, body=None, **_):
        sent.append((sender, tuple(body[0]), body[1], headers["id"]))

    url, pool = app.conf.broker_url, app._pool
    app.conf.broker_url, app._pool = "memory://", None
    after_task_publish.connect(record, weak=False)
    yield sent
    after_task_publish.disconnect(record)
    app.conf.broker_url, app._pool = url, pool
