from django.core.management.base import BaseCommand, CommandError

from core.crm import CrmError, crm_check, crm_stats


class Command(BaseCommand):
    help = (
        "Checks that the CRM answers and accepts the credentials (an empty batch: "
        "no CRM data changes); --stats also counts rows by delivery state."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--stats",
            action="store_true",
            help="Also print rows by delivery state and the oldest undelivered row.",
        )

    def handle(self, *args, stats=False, **options):
        if stats:
            self._stats()
        try:
            check = crm_check()
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
