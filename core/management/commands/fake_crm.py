import logging
import sys

from django.core.management.base import BaseCommand, CommandError

from core.fake_crm import FakeCrm

LOOPBACK_HOSTS = {"127.0.0.1", "localhost"}
_log_handler = logging.StreamHandler(sys.stderr)
_log_handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))


def rate(value: str) -> float:
    number = float(value)
    if not 0 <= number <= 1:
        raise ValueError(value)
    return number


class Command(BaseCommand):
    help = (
        "Runs a fake CRM that implements docs/crm-contract.md (POST /records; GET /records "
        "and /stats show what it holds) until Ctrl-C."
    )

    def add_arguments(self, parser):
        parser.add_argument("--host", default="127.0.0.1", help="Address (default 127.0.0.1).")
        parser.add_argument("--port", type=int, default=8099, help="Port; 0 picks a free one.")
        parser.add_argument("--token", help="Require Authorization: Token|Bearer TOKEN.")
        parser.add_argument("--signing-secret", help="Require a valid X-Signature.")
        parser.add_argument(
            "--fail-rate",
            type=rate,
            default=0.0,
            help="Share of POSTs answered with a 500, a 429 with Retry-After, or a dropped "
            "connection (before or after storing the batch), 0 to 1.",
        )
        parser.add_argument(
            "--retry-after", type=int, default=1, help="Seconds its 429s ask for (default 1)."
        )
        parser.add_argument(
            "--latency-ms", type=float, default=0, help="Wait this long before every answer."
        )
        parser.add_argument(
            "--reject-user-id",
            action="append",
            default=[],
            metavar="ID",
            help="Refuse records of this user id (repeatable): a batch holding one gets a "
            "400, the record alone a 422.",
        )
        parser.add_argument(
            "--rate-limit",
            type=int,
            metavar="N",
            help="Answer 429 with Retry-After beyond N requests a minute.",
        )
        parser.add_argument("--seed", type=int, help="Same seed, same failures.")

    def handle(self, *args, **options):
        try:
            crm = FakeCrm(
                host=options["host"],
                port=options["port"],
                token=options["token"],
                signing_secret=options["signing_secret"],
                fail_rate=options["fail_rate"],
                latency_ms=options["latency_ms"],
                reject_user_ids=tuple(options["reject_user_id"]),
                rate_limit=options["rate_limit"],
                retry_after=options["retry_after"],
                seed=options["seed"],
            )
        except OSError as exc:
            raise CommandError(
                f"Cannot listen on {options['host']}:{options['port']}: {exc.strerror or exc}. "
                "Is something else using that port? Pick another with --port (0: any free one)."
            ) from exc
        except ValueError as exc:
            raise CommandError(f"Bad option: {exc}.") from exc
        logger = logging.getLogger("core.fake_crm")
        if options["verbosity"] >= 2:
            logger.setLevel(logging.DEBUG)
            logger.addHandler(_log_handler)
            logger.propagate = False
        write = self.stdout.write
        write(f"Fake CRM listening on {crm.url}")
        write(f"  CRM_API_URL={crm.url}")
        write(f"  CRM_PUNCHES_URL={crm.punches_url}")
        write(f"  token: {options['token'] or 'none required'}")
        write(f"  signature: {'required' if options['signing_secret'] else 'not checked'}")
        if options["fail_rate"]:
            write(f"  fails {options['fail_rate']:.0%} of POSTs")
        if options["rate_limit"]:
            write(f"  at most {options['rate_limit']} requests a minute")
        if options["reject_user_id"]:
            write(f"  refuses user ids {', '.join(options['reject_user_id'])}")
        if crm.host not in LOOPBACK_HOSTS:
            write(self.style.WARNING(f"  {crm.host} is reachable from other machines."))
        write(
            f"  what it holds: GET http://{crm.host}:{crm.port}/records and /punches, "
            "counts at /stats"
        )
        write("Ctrl-C to stop.")
        self.stdout.flush()
        try:
            crm.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            crm.stop()
        self.stdout.write("Fake CRM stopped.")
