import logging
import sys
from datetime import datetime, timedelta

from django.core.management.base import BaseCommand, CommandError

from core.zk.emulator import DeviceState, PushClock, ZKEmulator, parse_down_windows

GENERATE_DEFAULTS = {"users": 50, "punches": 5000, "days": 30, "seed": 1}
LOOPBACK_HOSTS = {"127.0.0.1", "localhost"}
LOG_LEVELS = {0: logging.WARNING, 1: logging.WARNING, 2: logging.INFO, 3: logging.DEBUG}
_log_handler = logging.StreamHandler(sys.stderr)
_log_handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))


def build_state(*, data: str | None, clock_offset: float, **generate) -> DeviceState:
    """The device to serve: loaded from `data`, or generated (unset options take defaults).

    Raises CommandError saying what to fix.
    """
    chosen = {key: value for key, value in generate.items() if value is not None}
    if data:
        if chosen:
            names = ", ".join(f"--{key}" for key in chosen)
            raise CommandError(f"--data serves the file as it is; drop {names} or drop --data.")
        try:
            return DeviceState.from_json(data)
        except OSError as exc:
            raise CommandError(f"Cannot read --data {data}: {exc.strerror or exc}.") from exc
        except ValueError as exc:
            raise CommandError(f"--data {data} is not a valid device file: {exc}.") from exc
    try:
        return DeviceState.generate(
            **{**GENERATE_DEFAULTS, **chosen},
            now=datetime.now() + timedelta(seconds=clock_offset),
        )
    except (ValueError, OverflowError) as exc:
        raise CommandError(f"Cannot generate the device data: {exc}.") from exc


class Command(BaseCommand):
    help = (
        "Runs a fake ZKTeco clock that speaks the binary protocol (TCP and UDP on one "
        "port) until Ctrl-C; with --push, a clock that pushes the same data over HTTP to "
        "a server's /iclock/ instead. See docs/emulator.md."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--host", default="127.0.0.1", help="Address to listen on (default 127.0.0.1)."
        )
        parser.add_argument(
            "--port", type=int, default=4370, help="TCP and UDP port; 0 picks a free one."
        )
        parser.add_argument("--data", metavar="FILE", help="Serve the device in this JSON file.")
        generated = parser.add_argument_group(
            "generated data (when --data is not given)",
            "Defaults: "
            + ", ".join(f"--{key} {value}" for key, value in GENERATE_DEFAULTS.items()),
        )
        generated.add_argument("--users", type=int, help="Number of employees.")
        generated.add_argument("--punches", type=int, help="Exact number of attendance records.")
        generated.add_argument("--days", type=int, help="The records span the last DAYS days.")
        generated.add_argument("--seed", type=int, help="Same seed, same data.")
        parser.add_argument(
            "--save", metavar="FILE", help="Write the served device data to FILE as JSON first."
        )
        parser.add_argument(
            "--comm-key", type=int, help="Device password (default: the file's, or 0)."
        )
        parser.add_argument(
            "--chunked",
            action="store_true",
            help="Over TCP, answer bulk reads in 1504 chunks like a real clock.",
        )
        parser.add_argument(
            "--encoding",
            default="utf-8",
            help="Code page user names are stored in (default utf-8; e.g. cp1251).",
        )
        parser.add_argument(
            "--record-size",
            type=int,
            choices=(8, 16, 40, 49),
            help="Attendance record size on both transports (default: 40 TCP, 16 UDP).",
        )
        parser.add_argument(
            "--clock-offset",
            type=float,
            default=0.0,
            metavar="SECONDS",
            help="Device clock minus this computer's clock.",
        )
        parser.add_argument(
            "--live-interval",
            type=float,
            metavar="SECONDS",
            help="Someone punches this often (logged, and pushed to clients listening for events).",
        )
        parser.add_argument(
            "--drop-after-bytes",
            type=int,
            metavar="N",
            help="Fault: reset each TCP connection after N bytes of replies.",
        )
        parser.add_argument(
            "--stall-after-bytes",
            type=int,
            metavar="N",
            help="Fault: stop answering each TCP connection after N bytes of replies "
            "(a device that hangs mid-transfer).",
        )
        parser.add_argument(
            "--delay-ms", type=float, default=0, help="Fault: wait this long before every reply."
        )
        parser.add_argument(
            "--silent", action="store_true", help="Fault: accept connections, never answer."
        )
        parser.add_argument(
            "--punch-during-read",
            action="store_true",
            help="Fault: someone punches after every record-count read and between the "
            "chunks of a bulk read (while disabled: at the next enable).",
        )
        parser.add_argument(
            "--ignore-disable",
            action="store_true",
            help="With --punch-during-read: the clock records punches even while disabled.",
        )

        push = parser.add_argument_group(
            "push mode (ZKTeco PUSH / ADMS, see docs/push.md)",
            "The clock pushes its data to a server's /iclock/ instead of listening.",
        )
        push.add_argument(
            "--push",
            metavar="URL",
            help="Push to this server root, e.g. http://127.0.0.1:8000 (no listening port).",
        )
        push.add_argument("--serial", help="Serial number to push as (default: the data's).")
        push.add_argument(
            "--push-drop-rate",
            type=float,
            default=0.0,
            metavar="P",
            help="Fault: with probability P the connection dies after an upload is sent, "
            "before the answer is read (the batch comes again).",
        )
        push.add_argument(
            "--push-down",
            default="",
            metavar="START:END[,...]",
            help="Fault: seconds after start in which the clock reaches nobody, e.g. 30:60.",
        )

    def handle(self, *args, **options):
        push_only = [
            flag
            for flag, given in (
                ("--serial", options["serial"]),
                ("--push-drop-rate", options["push_drop_rate"]),
                ("--push-down", options["push_down"]),
            )
            if given
        ]
        if push_only and not options["push"]:
            raise CommandError(f"{', '.join(push_only)} only apply with --push URL.")
        state = build_state(
            data=options["data"],
            clock_offset=options["clock_offset"],
            **{key: options[key] for key in GENERATE_DEFAULTS},
        )
        if options["save"]:
            try:
                state.to_json(options["save"])
            except OSError as exc:
                raise CommandError(f"Cannot write --save {options['save']}: {exc}.") from exc
        if options["push"]:
            self._push(state, options)
            return
        try:
            emulator = ZKEmulator(
                state,
                host=options["host"],
                port=options["port"],
                comm_key=options["comm_key"],
                chunked=options["chunked"],
                drop_after_bytes=options["drop_after_bytes"],
                stall_after_bytes=options["stall_after_bytes"],
                delay_ms=options["delay_ms"],
                silent=options["silent"],
                live_interval=options["live_interval"],
                clock_offset=options["clock_offset"],
                encoding=options["encoding"],
                record_size=options["record_size"],
                punch_during_read=options["punch_during_read"],
                ignore_disable=options["ignore_disable"],
            )
        except ValueError as exc:
            raise CommandError(f"Bad option: {exc}.") from exc
        # Per-command lines at -v 2, checksums and skipped bytes at -v 3, only
        # problems below; kept off the project's root handler while we run.
        logger = logging.getLogger("core.zk.emulator")
        saved_level, saved_propagate = logger.level, logger.propagate
        logger.setLevel(LOG_LEVELS.get(options["verbosity"], logging.DEBUG))
        logger.addHandler(_log_handler)
        logger.propagate = False
        try:
            self._serve(emulator, options)
        finally:
            logger.removeHandler(_log_handler)
            logger.setLevel(saved_level)
            logger.propagate = saved_propagate

    def _push(self, state: DeviceState, options: dict) -> None:
        try:
            down = parse_down_windows(options["push_down"])
        except ValueError as exc:
            raise CommandError(f"--push-down: {exc}.") from exc
        try:
            clock = PushClock(
                state,
                options["push"],
                serial=options["serial"],
                live_interval=options["live_interval"],
                clock_offset=options["clock_offset"],
                drop_rate=options["push_drop_rate"],
                down=down,
            )
        except ValueError as exc:
            raise CommandError(f"Bad push option: {exc}.") from exc
        logger = logging.getLogger("core.zk.emulator")
        saved_level, saved_propagate = logger.level, logger.propagate
        logger.setLevel(LOG_LEVELS.get(options["verbosity"], logging.DEBUG))
        logger.addHandler(_log_handler)
        logger.propagate = False
        write = self.stdout.write
        write(f"ZK emulator pushing to {options['push']}/iclock/ as serial {clock.serial}")
        write(
            f"  {len(state.users)} users, {len(state.attendance)} attendance records to upload "
            "from the server's stamp"
        )
        if options["live_interval"]:
            write(f"  someone punches every {options['live_interval']} s, uploaded at once")
        faults = [
            f"{clock.drop_rate:g} of uploads lose their answer" if clock.drop_rate else "",
            "down " + ", ".join(f"{a:g}-{b:g} s" for a, b in down) if down else "",
        ]
        if any(faults):
            write(f"  faults: {'; '.join(f for f in faults if f)}")
        if clock.host not in LOOPBACK_HOSTS | {"::1"}:
            write(self.style.WARNING(f"  {clock.host} is not this computer."))
        write("Ctrl-C to stop.")
        self.stdout.flush()
        clock.start()
        try:
            clock.run_forever()
        except KeyboardInterrupt:
            pass
        finally:
            clock.stop()
            logger.removeHandler(_log_handler)
            logger.setLevel(saved_level)
            logger.propagate = saved_propagate
        stats = clock.stats
        write(
            f"Push clock stopped: {stats.requests} requests, {stats.punches_acknowledged} "
            f"punches acknowledged, {stats.dropped} answers dropped, {stats.failures} failures."
        )

    def _serve(self, emulator: ZKEmulator, options: dict) -> None:
        try:
            emulator.start()
        except OSError as exc:
            raise CommandError(
                f"Cannot listen on {options['host']}:{options['port']}: {exc.strerror or exc}. "
                "Is something else using that port? Pick another with --port (0: any free one)."
            ) from exc
        self._describe(emulator, options)
        try:
            emulator.serve_forever()
        except KeyboardInterrupt:
            emulator.stop()
        self.stdout.write("Emulator stopped.")

    def _describe(self, emulator: ZKEmulator, options: dict) -> None:
        state = emulator.state
        write = self.stdout.write
        write(f"ZK emulator listening on {emulator.host}:{emulator.port} (TCP and UDP)")
        write(
            f"Serving {state.device_name} {state.serial_number}: {len(state.users)} users, "
            f"{len(state.attendance)} attendance records, {len(state.templates)} fingerprint "
            f"templates; comm key {emulator.comm_key or 'none (0)'}"
        )
        bulk = "1504 chunks (--chunked)" if emulator.chunked else "one DATA frame per table"
        write(
            f"  TCP: 72-byte users, {emulator.record_size(True)}-byte records, bulk reads in {bulk}"
        )
        write(
            f"  UDP: 28-byte users, {emulator.record_size(False)}-byte records, "
            "bulk reads in 1504 chunks"
        )
        if emulator.encoding != "utf-8":
            write(f"  user names in {emulator.encoding}")
        if options["live_interval"]:
            write(f"  someone punches every {options['live_interval']} s")
        faults = [
            f"reset after {emulator.drop_after_bytes} bytes"
            if emulator.drop_after_bytes is not None
            else "",
            f"hangs after {emulator.stall_after_bytes} bytes"
            if emulator.stall_after_bytes is not None
            else "",
            f"{emulator.delay_ms:g} ms delay" if emulator.delay_ms else "",
            "silent" if emulator.silent else "",
            "punches during reads"
            + (" (recorded while disabled)" if emulator.ignore_disable else "")
            if emulator.punch_during_read
            else "",
        ]
        if any(faults):
            write(f"  faults: {', '.join(f for f in faults if f)}")
        if emulator.host not in LOOPBACK_HOSTS:
            write(self.style.WARNING(f"  {emulator.host} is reachable from other machines."))
        if options["save"]:
            write(f"  device data written to {options['save']}")
        write("Ctrl-C to stop.")
        self.stdout.flush()
