"""Delete processed-event records past their retention, in batches, with progress."""

from __future__ import annotations

import re
import time
from datetime import datetime, timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DEFAULT_DB_ALIAS, connections, router
from django.db.models import Count

from idempotency.clock import database_now
from idempotency.conf import app_settings
from idempotency.models import ProcessedEvent, RetentionCutoffs, retention_cutoffs
from idempotency.purging import purge_other_records

UNITS = {"d": "days", "h": "hours", "m": "minutes", "s": "seconds"}
AGE = re.compile(r"^\s*(\d+)\s*([dhms])\s*$")


def parse_age(value: str) -> timedelta:
    """``30d``, ``12h``, ``90m`` or ``45s`` as a positive timedelta."""
    match = AGE.match(value)
    if not match:
        raise CommandError(
            f"--older-than {value!r} is not an age: write a whole number and a unit, "
            "d (days), h (hours), m (minutes) or s (seconds), e.g. 30d, 12h, 90m"
        )
    age = timedelta(**{UNITS[match[2]]: int(match[1])})
    if age <= timedelta(0):
        raise CommandError(f"--older-than must be longer than zero, not {value!r}")
    return age


class _Progress:
    """A tqdm bar on a terminal, nothing otherwise; written through the command's stdout.

    tqdm is optional (the progress extra): without it the purge runs the same, without a bar.
    """

    def __init__(self, command: BaseCommand, total: int | None) -> None:
        self._bar: Any = None
        if command.stdout.isatty():
            try:
                from tqdm import tqdm
            except ImportError:
                command.stdout.write(
                    'purging (pip install "django-idempotency[progress]" for a progress bar)'
                )
                return

            self._bar = tqdm(
                total=total,
                file=_Unterminated(command),
                unit=" ids",
                unit_scale=True,
                desc="purging",
                dynamic_ncols=True,
            )

    def update(self, swept: int, span: int, deleted: int) -> None:
        if self._bar is not None:
            self._bar.total = span
            self._bar.update(swept - self._bar.n)
            self._bar.set_postfix_str(f"{deleted:,} deleted", refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class _Unterminated:
    """tqdm redraws a line with carriage returns: pass its writes on without a line ending."""

    def __init__(self, command: BaseCommand) -> None:
        self._stdout = command.stdout

    def write(self, text: str) -> None:
        self._stdout.write(text, ending="")

    def flush(self) -> None:
        self._stdout.flush()


class Command(BaseCommand):
    help = (
        "Delete processed-event records past their retention (IDEMPOTENCY['RETENTION'], "
        "CONSUMER_RETENTION per consumer), in batches of one transaction each. Safe to "
        "interrupt and run again. Consumers whose retention is None are never purged."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--older-than",
            metavar="AGE",
            help="delete records older than AGE (30d, 12h, 90m, 45s) instead of RETENTION; "
            "consumers with their own CONSUMER_RETENTION keep it unless named by --consumer",
        )
        parser.add_argument("--consumer", help="purge this consumer's records only")
        parser.add_argument(
            "--batch-size",
            type=int,
            metavar="N",
            help="records per transaction (default: IDEMPOTENCY['PURGE_BATCH_SIZE'])",
        )
        parser.add_argument(
            "--dry-run", action="store_true", help="count what would be deleted, delete nothing"
        )
        parser.add_argument(
            "--database",
            help="the database holding the inbox (default: where the routers write it)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        self.verbosity = int(options["verbosity"])
        using = self._database(options["database"])
        batch_size = options["batch_size"]
        if batch_size is None:
            batch_size = app_settings.PURGE_BATCH_SIZE
        if batch_size < 1:
            raise CommandError(f"--batch-size must be at least 1, not {batch_size}")
        consumer = options["consumer"]
        if consumer is not None and app_settings.retention_for(consumer) is None:
            raise CommandError(
                f"the retention of consumer {consumer!r} is None: its records are kept forever "
                "and never purged (see IDEMPOTENCY['CONSUMER_RETENTION'] and ['RETENTION'])"
            )
        # The database's clock stamped the records: a cut-off from this process's clock would
        # purge fresh records whenever it runs ahead.
        now = database_now(using)
        before = None
        if options["older_than"] is not None:
            before = now - parse_age(options["older_than"])
        cutoffs = retention_cutoffs(before, consumer=consumer, now=now)
        self._describe(cutoffs)
        records = ProcessedEvent.objects.using(using)
        if options["dry_run"]:
            self._dry_run(records.purgeable(before, consumer=consumer, now=now))
            return
        self._purge(records, before, batch_size=batch_size, consumer=consumer, now=now)
        if consumer is None:
            others = purge_other_records(before=before, now=now, batch_size=batch_size, using=using)
            for kind, count in others.items():
                self.stdout.write(f"Deleted {count:,} {kind}.")

    def _database(self, alias: str | None) -> str:
        using = alias or router.db_for_write(ProcessedEvent) or DEFAULT_DB_ALIAS
        if using not in connections:
            raise CommandError(f"--database {using!r} is not in settings.DATABASES")
        return using

    def _describe(self, cutoffs: RetentionCutoffs) -> None:
        if self.verbosity < 1:
            return
        self.stdout.write("Retention cutoffs:")
        for name, cutoff in sorted(cutoffs.consumers.items()):
            self.stdout.write(f"  {name}: {_when(cutoff)}")
        if cutoffs.others is not None or not cutoffs.consumers:
            label = "every other consumer" if cutoffs.consumers else "every consumer"
            self.stdout.write(f"  {label}: {_when(cutoffs.others)}")

    def _dry_run(self, purgeable: Any) -> None:
        counts = purgeable.order_by().values("consumer").annotate(n=Count("pk"))
        per_consumer = sorted((row["consumer"], row["n"]) for row in counts)
        total = sum(n for _, n in per_consumer)
        for name, n in per_consumer:
            self.stdout.write(f"  {name}: {n:,}")
        self.stdout.write(f"Dry run: {total:,} records would be deleted; nothing was.")

    def _purge(self, records: Any, before: datetime | None, **options: Any) -> None:
        progress = _Progress(self, None)
        deleted = 0
        started = time.monotonic()
        try:
            for batch in records.purge_batches(before, **options):
                deleted += batch.deleted
                progress.update(batch.swept, batch.span, deleted)
        except KeyboardInterrupt:
            progress.close()
            self.stdout.write(
                f"Interrupted: {deleted:,} records deleted in the batches that committed; "
                "run the command again to go on."
            )
            raise CommandError("interrupted", returncode=130) from None
        progress.close()
        seconds = time.monotonic() - started
        rate = deleted / seconds if seconds > 0 else 0.0
        self.stdout.write(
            self.style.SUCCESS(
                f"Deleted {deleted:,} processed-event records in {seconds:.2f} s "
                f"({rate:,.0f} rows/s)."
            )
        )


def _when(cutoff: datetime | None) -> str:
    return "kept forever" if cutoff is None else f"records processed before {cutoff.isoformat()}"
