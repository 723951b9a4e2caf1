"""Progress bars for long commands: drawn on a terminal, absent in logs and pipes."""

from __future__ import annotations

import sys
import threading
from typing import TextIO

from tqdm import tqdm


def is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class Progress:
    """One bar of `done` out of `total`, on `stream` (stderr) when it is a terminal.

    Use as a context manager; `update` is a stage function's progress callback.
    Off a terminal every call does nothing, so cron mails and log files stay clean.
    """

    def __init__(self, *, desc: str, unit: str, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = is_terminal(self.stream)
        self.desc, self.unit = desc, unit
        self._bar: tqdm | None = None

    def update(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self._bar is None:
            self._bar = tqdm(
                desc=self.desc, unit=self.unit, total=total, file=self.stream, leave=False
            )
        self._bar.total = max(total, done)
        self._bar.n = done
        self._bar.refresh()

    @property
    def callback(self):
        """The callback to hand a stage function: None off a terminal."""
        return self.update if self.enabled else None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info) -> None:
        if self._bar is not None:
            self._bar.close()


class PollProgress:
    """A bar per device being downloaded (bytes received), for devices_poll's
    progress events; several devices may report at once, from threads."""

    def __init__(self, *, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = is_terminal(self.stream)
        self._bars: dict[int, tqdm] = {}
        self._lock = threading.Lock()

    def event(self, device, event: str, amount: int) -> None:
        with self._lock:
            bar = self._bars.get(device.pk)
            if bar is None:
                bar = self._bars[device.pk] = tqdm(
                    desc=device.name,
                    unit="B",
                    unit_scale=True,
                    file=self.stream,
                    position=len(self._bars),
                    leave=False,
                )
            if event == "records":
                bar.set_postfix_str(f"{amount} records on the device")
            elif event == "bytes":
                bar.update(amount)
            elif event == "storing":
                bar.set_postfix_str(f"storing {amount} punches")

    @property
    def callback(self):
        return self.event if self.enabled else None

    def __enter__(self) -> PollProgress:
        return self

    def __exit__(self, *exc_info) -> None:
        for bar in self._bars.values():
            bar.close()
