from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from core.crm import CrmError, crm_check, crm_punch_stats, crm_stats


class Command(BaseCommand):
    help = (
        "Checks that the CRM answers and accepts the credentials (an empty batch: "
        "no CRM data changes), at CRM_API_URL and, when set, CRM_PUNCHES_URL; --stats "
        "also counts rows (and raw punches) by delivery state."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--stats",
            action="store_true",
            help="Also print rows (and raw punches, with CRM_PUNCHES_URL) by delivery state "
            "and the oldest undelivered one.",
        )

    def handle(self, *args, stats=False, **options):
        if stats:
            self._stats()
            if settings.CRM_PUNCHES_URL:
                self._punch_stats()
        targets = []
        if settings.CRM_API_URL or not settings.CRM_PUNCHES_URL:
            targets.append(False)
        if settings.CRM_PUNCHES_URL:
            targets.append(True)
        for punches in targets:
            try:
                check = crm_check(punches=punches)
            except CrmError as exc:
                raise CommandError(str(exc)) from exc
            if not check.ok:
                raise CommandError(check.message)
            self.stdout.write(check.message)

    def _stats(self) -> None:
        report = crm_stats()
        counts = ", ".join(f"{state} {count}" for state, count in report.by_state.items())
        self.stdout.write(f"rows: {counts}; in flight {report.in_flight}")
        oldest = report.oldest_undelivered
        if oldest is None:
            rejected = report.by_state.get("rejected", 0)
            self.stdout.write(
                "oldest undelivered: none pending or failed"
                + (f" ({rejected} rejected wait for a change or a resend)" if rejected else "")
            )
            return
        line = (
            f"oldest undelivered: {oldest['user_id']} on {oldest['work_date']} "
            f"({oldest['sync_state']} since {oldest['updated_at']:%Y-%m-%d %H:%M} UTC)"
        )
        if oldest["last_sync_error"]:
            line += f": {oldest['last_sync_error'][:200]}"
        self.stdout.write(line)

    def _punch_stats(self) -> None:
        report = crm_punch_stats()
        counts = ", ".join(f"{state} {count}" for state, count in report.by_state.items())
        self.stdout.write(f"raw punches: {counts}; in flight {report.in_flight}")
        oldest = report.oldest_undelivered
        if oldest is None:
            self.stdout.write("oldest undelivered punch: none pending or failed")
            return
        line = (
            f"oldest undelivered punch: {oldest['raw__user_id']} at "
            f"{oldest['raw__timestamp']:%Y-%m-%d %H:%M:%S} UTC on {oldest['raw__device__name']} "
            f"({oldest['sync_state']} since {oldest['created_at']:%Y-%m-%d %H:%M} UTC)"
        )
        if oldest["last_sync_error"]:
            line += f": {oldest['last_sync_error'][:200]}"
        self.stdout.write(line)
