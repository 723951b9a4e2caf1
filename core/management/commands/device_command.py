import datetime

from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from core.adms import CommandRefused, command_shown, devices_command_queue
from core.audit import audit_commands
from core.models import Device

KINDS = {
    "info": "info",
    "check": "check",
    "reboot": "reboot",
    "reupload": "reupload",
    "user-update": "user_update",
    "user-delete": "user_delete",
}


def _date(value: str) -> datetime.date:
    try:
        return datetime.date.fromisoformat(value)
    except ValueError:
        raise CommandError(f"{value!r} is not a date like 2026-11-01.") from None


class Command(BaseCommand):
    help = (
        "Queues a command for a clock that pushes (Cloud server); the clock takes it at its "
        "next poll, and the admin's Device commands page shows its result. Like the admin's "
        "device and employee actions (permissions core.send_info_command, "
        "core.send_check_command, core.send_reboot_command, core.send_reupload_command, "
        "core.manage_device_users). Each command queued is recorded in the audit log, with "
        "no user."
    )

    def add_arguments(self, parser):
        parser.add_argument("device", help="The device's name or serial number.")
        parser.add_argument(
            "kind",
            choices=list(KINDS),
            help=(
                "info: report counts and options; check: re-read options and upload what is "
                "new; reboot; reupload: send a date range of punches again (--from, --to); "
                "user-update: add or change a user (--user-id, --name, --privilege, --card); "
                "user-delete: remove a user (--user-id)."
            ),
        )
        parser.add_argument("--from", dest="start", help="reupload: first day, YYYY-MM-DD.")
        parser.add_argument("--to", dest="end", help="reupload: last day, YYYY-MM-DD (included).")
        parser.add_argument("--user-id", default="", help="user-update, user-delete: the PIN.")
        parser.add_argument("--name", default="", help="user-update: the name on the clock.")
        parser.add_argument(
            "--privilege", type=int, default=0, help="user-update: 0 user, 14 super-admin."
        )
        parser.add_argument("--card", type=int, default=0, help="user-update: card number.")

    def handle(self, *args, device, kind, start, end, user_id, name, privilege, card, **options):
        found = list(Device.objects.filter(name=device)) or list(
            Device.objects.filter(serial_number=device)
        )
        if not found:
            raise CommandError(f"No device named {device!r} or with that serial number.")
        values = {}
        if kind == "reupload":
            if not start or not end:
                raise CommandError("reupload needs --from and --to.")
            values = {
                "start": datetime.datetime.combine(_date(start), datetime.time.min),
                "end": datetime.datetime.combine(_date(end), datetime.time(23, 59, 59)),
            }
        elif kind == "user-update":
            values = {"user_id": user_id, "name": name, "privilege": privilege, "card": card}
        elif kind == "user-delete":
            values = {"user_id": user_id}
        try:
            with transaction.atomic():
                result = devices_command_queue(
                    devices=found[:1], kind=KINDS[kind], created_by="device_command", **values
                )
                # No user: the audit log shows the command line's entries as the system's.
                audit_commands(actor=None, commands=result.queued)
        except CommandRefused as exc:
            raise CommandError(str(exc)) from None
        if result.refused:
            raise CommandError(" ".join(result.refused))
        for command in result.queued:
            self.stdout.write(
                self.style.SUCCESS(
                    f"Queued command {command.pk} for {command.device.name}: "
                    f"{command_shown(command.command).replace(chr(9), ' ')}"
                )
            )
