"""Runs several processes as one: web, worker and beat (and the demo's device
and CRM), their output merged with a name in front of each line, all stopped
together.

Each child runs in its own process group. Ctrl-C, SIGTERM or SIGHUP sent to
the launcher sends each child its stop signal (SIGTERM by default), to the
child alone, so that gunicorn and Celery stop their own workers in order;
after stop_timeout, or at a second Ctrl-C, every child's whole group is
killed, which takes whatever they started with them. When one child exits on its own, the
others are stopped too: a bridge without its worker is not running. On Linux a
child also gets SIGTERM if the launcher itself is killed outright.

Standard library only: it runs before and around Django.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TextIO

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the launcher dies (Linux only)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Child:
    name: str
    process: subprocess.Popen
    stop_signal: int = signal.SIGTERM
    lines: list[str] = field(default_factory=list)
    reader: threading.Thread | None = None

    @property
    def pgid(self) -> int:
        # process_group=0 made the child the leader of a group numbered by its pid.
        return self.process.pid


class LaunchError(RuntimeError):
    """A child could not be started or did not get ready in time."""


class Launcher:
    """Starts children, prefixes their output, stops them all together."""

    def __init__(self, *, out: TextIO | None = None, stop_timeout: float = 30.0) -> None:
        self.out = out or sys.stdout
        self.stop_timeout = stop_timeout
        self.children: list[Child] = []
        self._write_lock = threading.Lock()
        self._changed = threading.Condition()
        self._stop_requests = 0
        self._stopped = False
        self._width = 6

    # -- output ----------------------------------------------------------------------

    def say(self, text: str, *, name: str = "bridge") -> None:
        with self._write_lock:
            for line in text.splitlines() or [""]:
                self.out.write(f"{name:<{self._width}} | {line}\n")
            self.out.flush()

    def _pump(self, child: Child) -> None:
        stream = child.process.stdout
        for raw in iter(stream.readline, ""):
            line = raw.rstrip("\n")
            self.say(line, name=child.name)
            with self._changed:
                child.lines.append(line)
                del child.lines[:-200]  # only recent lines are looked for
                self._changed.notify_all()
        stream.close()
        with self._changed:
            self._changed.notify_all()

    # -- starting ----------------------------------------------------------------------

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        stop_signal: int = signal.SIGTERM,
    ) -> Child:
        """Starts `argv` in its own process group with `env` added to ours;
        `stop_signal` is what asks it to stop."""
        self._width = max(self._width, len(name))
        environment = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
        try:
            process = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                # A stray byte must not stop the reader, which would block the child.
                errors="replace",
                bufsize=1,
                env=environment,
                process_group=0,
                preexec_fn=_die_with_parent,
            )
        except OSError as exc:
            raise LaunchError(f"cannot start {name} ({argv[0]}): {exc.strerror or exc}") from exc
        child = Child(name=name, process=process, stop_signal=stop_signal)
        child.reader = threading.Thread(target=self._pump, args=(child,), daemon=True)
        child.reader.start()
        self.children.append(child)
        self.say(f"started {name} (pid {process.pid})")
        return child

    def wait_for_line(self, child: Child, pattern: str, *, timeout: float) -> re.Match:
        """Waits until the child prints a line matching `pattern`; returns the match.

        Raises LaunchError when the child exits first or `timeout` passes, or when
        a stop was asked for meanwhile.
        """
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in child.lines:
                    found = regex.search(line)
                    if found:
                        return found
                if self._stop_requests:
                    raise LaunchError("stopped before everything was started")
                if child.process.poll() is not None and not child.reader.is_alive():
                    raise LaunchError(
                        f"{child.name} exited (code {child.process.returncode}) before it was ready"
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise LaunchError(f"{child.name} was not ready after {timeout:.0f} s")
                self._changed.wait(min(left, 0.5))

    def wait_until(self, ready: Callable[[], bool], *, what: str, timeout: float) -> None:
        """Waits until `ready()` is true, checking twice a second; stops early on a
        stop request or a child's exit. Raises LaunchError."""
        deadline = time.monotonic() + timeout
        while not ready():
            if self._stop_requests:
                raise LaunchError("stopped before everything was started")
            exited = self.exited()
            if exited:
                raise LaunchError(
                    f"{exited.name} exited (code {exited.process.returncode}) before {what}"
                )
            if time.monotonic() > deadline:
                raise LaunchError(f"{what} did not happen within {timeout:.0f} s")
            with self._changed:
                self._changed.wait(0.5)

    # -- running and stopping ---------------------------------------------------------

    def exited(self) -> Child | None:
        return next((c for c in self.children if c.process.poll() is not None), None)

    def _on_signal(self, signum, frame) -> None:
        # Only a flag: every wait above wakes at least twice a second to look at it.
        self._stop_requests += 1
        if self._stop_requests > 1:
            self._kill_all()

    @contextlib.contextmanager
    def handling_signals(self):
        """Turns Ctrl-C, SIGTERM and SIGHUP into a stop request while inside."""
        previous = {sig: signal.signal(sig, self._on_signal) for sig in STOP_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    @property
    def stop_requested(self) -> bool:
        return self._stop_requests > 0

    def run_until_stopped(self) -> int:
        """Waits for a stop request or a child's exit, then stops every child.

        Returns 0 after a requested stop, else the exit code of the child that
        ended (1 if it ended with 0: it should not have ended).
        """
        code = 0
        while not self._stop_requests:
            exited = self.exited()
            if exited:
                code = exited.process.returncode or 1
                self.say(f"{exited.name} exited (code {exited.process.returncode}); stopping")
                break
            with self._changed:
                self._changed.wait(0.5)
        self.stop()
        return code

    def _signal_groups(self, sig: int) -> None:
        for child in self.children:
            # The group may outlive its leader (a worker process left behind).
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.pgid, sig)

    def _kill_all(self) -> None:
        self._signal_groups(signal.SIGKILL)

    def stop(self) -> None:
        """Each child's stop signal, up to stop_timeout for them to end, then SIGKILL
        to every child's group."""
        if not self.children or self._stopped:
            return
        self._stopped = True
        self.say("stopping everything (Ctrl-C again to kill at once)")
        for child in self.children:
            if child.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    # The leader only: it stops its own workers, in order.
                    child.process.send_signal(child.stop_signal)
        deadline = time.monotonic() + self.stop_timeout
        for child in self.children:
            left = max(deadline - time.monotonic(), 0.1)
            try:
                child.process.wait(timeout=left)
            except subprocess.TimeoutExpired:
                self.say(f"{child.name} did not stop within {self.stop_timeout:.0f} s; killing it")
        # Whatever is left in the groups (a stuck pool process) goes too.
        self._kill_all()
        for child in self.children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.process.wait(timeout=5)
            if child.reader is not None:
                child.reader.join(timeout=2)
        self.say("stopped")
