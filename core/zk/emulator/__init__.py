"""A fake ZKTeco time clock that speaks the binary protocol of port 4370.

The emulator listens on TCP and UDP on the same loopback port and answers every
request pyzk (0.9 and git HEAD) sends, in the formats a real clock uses for each
transport: 72-byte users and 40-byte attendance records over TCP, 28-byte users
and 16-byte records over UDP. Its data lives in a `DeviceState` that can be
generated, loaded from and saved to JSON, and changed while it runs.

Protocol facts and their sources are in shared/ZK_PROTOCOL.md; the section numbers
in the comments refer to it. docs/emulator.md says how to run it.

Pure Python (stdlib only, no Django): a thread per TCP connection, a thread per
UDP peer, one thread accepting, one reading UDP, one making live punches.

The package:
- state.py: the device's data (users, log, templates, options) and its JSON form;
- generate.py: generated data (shifts, breaks, double taps);
- wire.py: the binary wire format (commands, packets, record layouts), sharing
  the time encoding and user layouts with the reader through core/zk/protocol.py;
- session.py: one client's conversation, the handler of each command;
- server.py: ZKEmulator, its sockets, threads, live punches and faults;
- push.py: PushClock, the same data pushed over HTTP to /iclock/ (ZKTeco PUSH).
"""

from core.zk.emulator.push import PushClock, parse_down_windows
from core.zk.emulator.server import ZKEmulator
from core.zk.emulator.state import AttendanceRecord, DeviceState, FingerTemplate, UserRecord

# What callers use; the wire format's constants are read from .wire, the
# limits of a session or the server from their own modules.
__all__ = [
    "AttendanceRecord",
    "DeviceState",
    "FingerTemplate",
    "PushClock",
    "UserRecord",
    "ZKEmulator",
    "parse_down_windows",
]
