"""How long pyzk takes to read a big attendance log from the ZK device emulator.

    .venv/bin/python bench/bench_emulator_read.py [--users 500] [--punches 100000]

For each way the emulator serves bulk reads (TCP in one DATA frame, TCP in 1504
chunks, UDP in 1504 chunks) it prints the time of pyzk's get_attendance() and of
the bare transfer (pyzk's read_with_buffer, which core/zk/client.py uses). Every
read is checked against the served log. Loopback only; stops by itself.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zk import ZK  # noqa: E402
from zk import const as zk_const  # noqa: E402

from core.zk.emulator import DeviceState, ZKEmulator  # noqa: E402

MODES = (
    ("TCP, one DATA frame", False, False),
    ("TCP, 1504 chunks", False, True),
    ("UDP, 1504 chunks", True, False),
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=500)
    parser.add_argument("--punches", type=int, default=100_000)
    args = parser.parse_args()

    started = time.perf_counter()
    state = DeviceState.generate(users=args.users, punches=args.punches, days=150, seed=1)
    print(
        f"generated {len(state.attendance)} punches of {len(state.users)} users "
        f"in {time.perf_counter() - started:.2f} s"
    )
    expected = [(r.user_id, r.timestamp, r.status, r.punch) for r in state.attendance]
    failures = 0
    for label, udp, chunked in MODES:
        with ZKEmulator(state, chunked=chunked) as emu:
            conn = ZK(emu.host, port=emu.port, timeout=30, force_udp=udp, ommit_ping=True)
            conn.connect()
            started = time.perf_counter()
            _blob, size = conn.read_with_buffer(zk_const.CMD_ATTLOG_RRQ)
            transfer = time.perf_counter() - started
            started = time.perf_counter()
            records = conn.get_attendance()
            whole = time.perf_counter() - started
            conn.disconnect()
        exact = [(r.user_id, r.timestamp, r.status, r.punch) for r in records] == expected
        failures += not exact
        print(
            f"{label:20}  get_attendance {whole:6.2f} s ({len(records) / whole:7.0f} records/s)"
            f"  transfer only {transfer:5.2f} s ({size / transfer / 1e6:5.1f} MB/s)"
            f"  {'exact' if exact else 'MISMATCH'}"
        )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
