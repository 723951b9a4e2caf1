import datetime

from django.core.management.base import BaseCommand, CommandError

from core.management.progress import Progress
from core.processing import attendance_process


def iso_date(value: str) -> datetime.date:
    try:
        return datetime.date.fromisoformat(value)
    except ValueError:
        raise CommandError(f"{value!r} is not a date like 2026-11-02.") from None


class Command(BaseCommand):
    help = (
        "Builds daily clock-in/clock-out records from raw punches: by default only "
        "what punches stored since the last run touched. Runs with the server's own "
        "rights, like the admin's Recompute (permission core.change_processedattendance)."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--from", dest="date_from", type=iso_date, metavar="DATE", help="First work date."
        )
        parser.add_argument(
            "--to", dest="date_to", type=iso_date, metavar="DATE", help="Last work date."
        )
        parser.add_argument("--full", action="store_true", help="Recompute every day.")

    def handle(self, *args, date_from=None, date_to=None, full=False, **options):
        if full and (date_from or date_to):
            raise CommandError("Use either --full or --from/--to, not both.")
        if (date_from is None) != (date_to is None):
            raise CommandError("--from and --to go together: --from 2026-11-01 --to 2026-11-30.")
        if date_from and date_from > date_to:
            raise CommandError(f"--from {date_from} is after --to {date_to}.")
        with Progress(desc="processing", unit="employees") as progress:
            result = attendance_process(
                full=full, date_from=date_from, date_to=date_to, progress=progress.callback
            )
        for line in result.lines():
            self.stdout.write(line)
