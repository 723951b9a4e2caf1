from django.core.management.base import BaseCommand, CommandError

from core.ingest import device_test
from core.models import Device


def _count(used: int, capacity: int) -> str:
    if capacity:
        return f"{used} of {capacity} ({100 * used / capacity:.1f}%)"
    return str(used)


class Command(BaseCommand):
    help = (
        "Connects to devices and shows serial, firmware, counts and clock drift; changes "
        "nothing. A device a worker is polling is not contacted (busy). Runs with the server's own rights, like the admin's Test connection "
        "(permission core.test_device)."
    )

    def add_arguments(self, parser):
        parser.add_argument("names", nargs="*", metavar="NAME", help="Device name(s).")
        parser.add_argument(
            "--all",
            action="store_true",
            dest="all_devices",
            help="Every registered device with an IP address.",
        )

    def handle(self, *args, names=(), all_devices=False, **options):
        if all_devices == bool(names):
            raise CommandError("Name one or more devices, or pass --all.")
        if all_devices:
            # Clocks that push have no address to connect to (docs/push.md).
            devices = list(Device.objects.filter(ip_address__isnull=False))
        else:
            found = {d.name: d for d in Device.objects.filter(name__in=names)}
            missing = [name for name in names if name not in found]
            if missing:
                raise CommandError(f"No device named {', '.join(map(repr, missing))}.")
            devices = [found[name] for name in names]
        failures = busy = 0
        for device in devices:
            report = device_test(device=device)
            where = f"{device.name} ({device.ip_address}:{device.port} {device.protocol.upper()})"
            if report.busy:
                busy += 1
                self.stdout.write(self.style.WARNING(f"{where}: NOT TESTED: {report.error}"))
                continue
            if not report.ok:
                failures += 1
                self.stdout.write(self.style.ERROR(f"{where}: FAILED: {report.error}"))
                continue
            sizes = report.sizes
            self.stdout.write(self.style.SUCCESS(f"{where}: OK"))
            self.stdout.write(f"  serial number  {report.identity['serial_number']}")
            self.stdout.write(f"  firmware       {report.identity['firmware']}")
            self.stdout.write(f"  platform       {report.identity['platform']}")
            self.stdout.write(f"  users          {_count(sizes.users, sizes.users_capacity)}")
            self.stdout.write(f"  records        {_count(sizes.records, sizes.records_capacity)}")
            self.stdout.write(f"  clock drift    {report.clock_drift_seconds:+.0f} s")
        problems = []
        if failures:
            problems.append(f"{failures} of {len(devices)} device(s) could not be reached.")
        if busy:
            problems.append(
                f"{busy} of {len(devices)} device(s) were busy with a poll and not tested; "
                "run this again shortly."
            )
        if problems:
            raise CommandError(" ".join(problems))
