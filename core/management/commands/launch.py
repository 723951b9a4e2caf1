import os
import secrets
import signal
import sys
import urllib.error
import urllib.request

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError

from core.demo import demo_prepare
from core.launcher import Launcher, LaunchError

# Punches every few seconds, a poll, processing and delivery every minute: a
# punch reaches the fake CRM within two minutes of being made.
DEMO_INTERVALS = {
    "POLL_INTERVAL_MINUTES": "1",
    "PROCESS_INTERVAL_MINUTES": "1",
    "SYNC_INTERVAL_MINUTES": "1",
}
DEMO_DEVICE = {"users": "8", "punches": "400", "days": "14", "seed": "7"}
READY_TIMEOUT = 180.0


class Command(BaseCommand):
    help = (
        "Runs the web server, a Celery worker and beat together until Ctrl-C, which "
        "stops them all (./start.sh runs this). With --demo also an emulated clock whose "
        "people punch every few seconds and a fake CRM, both registered, and a demo "
        "admin login (its password is printed). Writes the demo's device and admin "
        "with the server's own rights."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--demo",
            action="store_true",
            help="Also run an emulated clock and a fake CRM, registered, with an admin login.",
        )
        parser.add_argument(
            "--host", default=None, help="Web address (default $HOST or 127.0.0.1)."
        )
        parser.add_argument(
            "--port", type=int, default=None, help="Web port (default $PORT or 8000)."
        )
        parser.add_argument(
            "--punch-every",
            type=float,
            default=5.0,
            metavar="SECONDS",
            help="--demo: someone punches on the emulated clock this often (default 5).",
        )

    def handle(self, *args, demo=False, host=None, port=None, punch_every=5.0, **options):
        host = host or os.environ.get("HOST") or "127.0.0.1"
        if port is None:
            try:
                port = int(os.environ.get("PORT") or 8000)
            except ValueError:
                raise CommandError(
                    f"PORT must be a port number, got {os.environ['PORT']!r}."
                ) from None
        if punch_every <= 0:
            raise CommandError("--punch-every must be a positive number of seconds.")
        # Before anything starts: the demo writes rows, and the worker waits for them.
        call_command("migrate", interactive=False, verbosity=1)
        launcher = Launcher(out=sys.stdout)
        failure = None
        code = 0
        with launcher.handling_signals():
            try:
                code = self._run(launcher, demo=demo, host=host, port=port, every=punch_every)
            except LaunchError as exc:
                launcher.say(f"could not start: {exc}")
                if not launcher.stop_requested:
                    failure = exc
            finally:
                # Whatever happened, nothing it started outlives it.
                launcher.stop()
        if failure is not None:
            raise CommandError(str(failure)) from failure
        if code:
            raise CommandError(f"stopped because a process exited (code {code})")

    def _run(self, launcher: Launcher, *, demo: bool, host: str, port: int, every: float) -> int:
        python = sys.executable
        manage = str(settings.BASE_DIR / "manage.py")
        env = {"HOST": host, "PORT": str(port)}
        banner = []
        if demo:
            env.update(DEMO_INTERVALS)
            env_demo, banner = self._start_demo(launcher, python, manage, every)
            env.update(env_demo)
        scripts = settings.BASE_DIR
        launcher.start("web", [str(scripts / "start_server.sh")], env=env)
        launcher.start("worker", [str(scripts / "start_worker.sh")], env=env)
        launcher.start("beat", [str(scripts / "start_beat.sh")], env=env)
        url = f"http://{host}:{port}"
        launcher.wait_until(
            lambda: _answers(f"{url}/health/"),
            what="the web server answered",
            timeout=READY_TIMEOUT,
        )
        lines = [
            "",
            "Attendance Bridge is running. Ctrl-C stops everything.",
            f"  Admin:    {url}/admin/",
            f"  Health:   {url}/health/",
        ]
        if not demo:
            lines.append(
                "  No login yet? .venv/bin/python manage.py createsuperuser "
                "(or ./start.sh --demo for a ready-made one)"
            )
        launcher.say("\n".join([*lines, *banner, ""]))
        return launcher.run_until_stopped()

    def _start_demo(
        self, launcher: Launcher, python: str, manage: str, every: float
    ) -> tuple[dict, list[str]]:
        data = settings.VAR_DIR / "demo-device.json"
        # The same people and history on every run: generated once, then loaded.
        source = (
            ["--data", str(data)]
            if data.exists()
            else [
                *(arg for key, value in DEMO_DEVICE.items() for arg in (f"--{key}", value)),
                "--save",
                str(data),
            ]
        )
        device = launcher.start(
            "device",
            [python, manage, "zk_emulator", "--port", "0", "--live-interval", str(every), *source],
            # The emulator's clock is this computer's local time: UTC, as registered.
            env={"TZ": "UTC"},
            stop_signal=signal.SIGINT,
        )
        token = secrets.token_urlsafe(16)
        crm = launcher.start(
            "crm",
            [python, manage, "fake_crm", "--port", "0", "--token", token],
            stop_signal=signal.SIGINT,
        )
        found = launcher.wait_for_line(
            device, r"ZK emulator listening on ([\d.]+):(\d+)", timeout=READY_TIMEOUT
        )
        device_host, device_port = found.group(1), int(found.group(2))
        crm_url = launcher.wait_for_line(crm, r"CRM_API_URL=(\S+)", timeout=READY_TIMEOUT).group(1)
        punches_url = launcher.wait_for_line(
            crm, r"CRM_PUNCHES_URL=(\S+)", timeout=READY_TIMEOUT
        ).group(1)
        setup = demo_prepare(device_host=device_host, device_port=device_port)
        env = {
            "CRM_API_URL": crm_url,
            "CRM_PUNCHES_URL": punches_url,
            "CRM_API_TOKEN": token,
            "CRM_API_TOKEN_FILE": "",
            "CRM_AUTH_SCHEME": "Token",
        }
        base = crm_url.rsplit("/", 1)[0]
        banner = [
            f"  Login:    {setup.username}",
            f"  Password: {setup.password}",
            f'  Device:   "{setup.device.name}", an emulated clock at {device_host}:{device_port}; '
            f"someone punches every {every:g} s",
            f"  CRM:      a fake CRM; what it received: curl -H 'Authorization: Token {token}' "
            f"{base}/stats (or /records, /punches)",
            "  Polls, processing and delivery run every minute: punches show in the admin "
            "(Raw punches) and at the fake CRM within two minutes.",
        ]
        return env, banner


def _answers(url: str) -> bool:
    """True when a web server answers at `url`, whatever the status."""
    try:
        with urllib.request.urlopen(url, timeout=2):  # noqa: S310 - our own loopback URL
            return True
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError):
        return False
