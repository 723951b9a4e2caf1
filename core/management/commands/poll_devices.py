from django.core.management.base import BaseCommand, CommandError

from core.ingest import devices_poll
from core.management.progress import PollProgress
from core.models import Device


class Command(BaseCommand):
    help = (
        "Downloads new punches from devices (default: every enabled device with an IP "
        "address; clocks that push have none). Runs with "
        "the server's own rights, like the admin's Poll now (permission core.poll_device)."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--device",
            action="append",
            dest="devices",
            metavar="NAME",
            help="Poll only this device (repeatable). Disabled devices are polled when named.",
        )
        parser.add_argument(
            "--full",
            action="store_true",
            help="Download every log even when its record count is unchanged.",
        )

    def handle(self, *args, devices=None, full=False, **options):
        if devices:
            found = {d.name: d for d in Device.objects.filter(name__in=devices)}
            missing = [name for name in devices if name not in found]
            if missing:
                raise CommandError(f"No device named {', '.join(map(repr, missing))}.")
            selected = [found[name] for name in devices]
            for device in selected:
                if not device.ip_address:
                    self.stdout.write(
                        f"{device.name}: has no IP address, it pushes its punches; skipped."
                    )
            selected = [device for device in selected if device.ip_address]
            if not selected:
                return
        else:
            # Devices without an IP address push their punches (core.adms).
            selected = list(Device.objects.filter(enabled=True, ip_address__isnull=False))
            if not selected:
                self.stdout.write("No enabled devices to poll. Add one in the admin.")
                return
        self.stdout.write(f"Polling {len(selected)} device(s)...")
        # Bars on a terminal only: a big first download takes minutes.
        with PollProgress() as progress:
            results = devices_poll(devices=selected, force_full=full, progress=progress.callback)
        for result in results:
            style = self.style.SUCCESS if result.ok else self.style.ERROR
            if result.busy:
                style = self.style.WARNING
            self.stdout.write(style(result.summary()))
        failed = [r for r in results if not r.ok and not r.busy]
        if failed:
            raise CommandError(f"{len(failed)} of {len(results)} device(s) failed.")
