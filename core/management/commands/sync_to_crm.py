from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from core.crm import CrmError, crm_preview, crm_punch_preview, crm_punch_sync, crm_sync
from core.management.progress import Progress


def positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise ValueError(value)
    return number


class Command(BaseCommand):
    help = (
        "Sends the daily records the CRM does not hold at their latest version, and "
        "with CRM_PUNCHES_URL set the raw punches not sent yet (see docs/crm-contract.md). Runs with the server's own rights; the admin's "
        "Resend to the CRM (permission core.resend_processedattendance, and "
        "core.resend_punchdelivery on raw punch deliveries) and Reset failed deliveries "
        "(core.reset_failed_processedattendance, core.reset_failed_punchdelivery) only make "
        "days and punches due for it."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--limit",
            type=positive,
            metavar="N",
            help="Send at most N records (and at most N punches) this run.",
        )
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help=(
                "Print the first request of daily records it would send, and with "
                "CRM_PUNCHES_URL set the first of raw punches; send nothing, change nothing."
            ),
        )

    def handle(self, *args, limit=None, dry_run=False, **options):
        try:
            if dry_run:
                if settings.CRM_API_URL or not settings.CRM_PUNCHES_URL:
                    request = crm_preview()
                    self.stdout.write(request or "Nothing is due: no request would be sent.")
                if settings.CRM_PUNCHES_URL:
                    request = crm_punch_preview()
                    self.stdout.write(
                        request or "No raw punch is due: no request would be sent to it."
                    )
                return
            stopped = []
            if settings.CRM_API_URL or not settings.CRM_PUNCHES_URL:
                with Progress(desc="daily records", unit="records") as progress:
                    result = crm_sync(limit=limit, progress=progress.callback)
                for line in result.lines():
                    self.stdout.write(f"daily records: {line}")
                if result.stopped:
                    stopped.append(f"daily records: {result.stopped}")
            if settings.CRM_PUNCHES_URL:
                with (
                    Progress(desc="raw punches: registering", unit="ids") as registering,
                    Progress(desc="raw punches", unit="punches") as progress,
                ):
                    punches = crm_punch_sync(
                        limit=limit,
                        progress=progress.callback,
                        register_progress=registering.callback,
                    )
                for line in punches.lines():
                    self.stdout.write(f"raw punches: {line}")
                if punches.stopped:
                    stopped.append(f"raw punches: {punches.stopped}")
        except CrmError as exc:
            raise CommandError(str(exc)) from exc
        if stopped:
            raise CommandError("Delivery stopped: " + "; ".join(stopped))
