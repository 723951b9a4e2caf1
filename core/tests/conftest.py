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
