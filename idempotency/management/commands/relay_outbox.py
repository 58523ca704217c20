"""Publish the outbox's pending messages: once, or continuously as a relay process; and
reconcile: publish again a published message whose event shows no outcome."""

from __future__ import annotations

import logging
import time
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DatabaseError, connections, router

from idempotency import outbox
from idempotency.exceptions import MissingExtra
from idempotency.extras import require
from idempotency.models import OutboxMessage

logger = logging.getLogger("idempotency")

#: The longest wait of ``--forever`` between attempts while the database or broker is away.
MAX_BACKOFF = 30.0
#: The largest --batch-size: one batch is one transaction holding its rows locked.
MAX_BATCH_SIZE = 10_000


class Command(BaseCommand):
    help = (
        "Publish pending outbox messages to the broker. With --forever it keeps relaying, "
        "waiting --interval seconds when there is nothing to do, and longer (up to 30 s) while "
        "the broker or the database is away. A message refused for good is marked failed and "
        "skipped; --retry-failed puts the failed messages back first. --forever also "
        "reconciles every --reconcile-every seconds (--reconcile: once, after relaying): a "
        "published message whose event has, after RECONCILE_AFTER, neither an inbox record "
        "nor a dead letter is published again."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--forever", action="store_true", help="keep relaying until stopped")
        parser.add_argument("--interval", type=float, default=1.0, help="seconds between polls")
        parser.add_argument("--batch-size", type=int, default=100, help="messages per transaction")
        parser.add_argument(
            "--retry-failed",
            action="store_true",
            help="re-drive the messages marked failed (clear failed_at) before relaying",
        )
        parser.add_argument(
            "--reconcile",
            action="store_true",
            help="after relaying, republish the published messages with no outcome (once)",
        )
        parser.add_argument(
            "--reconcile-every",
            type=float,
            default=60.0,
            help="with --forever: seconds between reconcile runs (0: never; default 60)",
        )

    def handle(  # type: ignore[no-untyped-def]
        self,
        *args: Any,
        forever: bool,
        interval: float,
        batch_size: int,
        retry_failed: bool,
        reconcile: bool,
        reconcile_every: float,
        **options: Any,
    ):
        if not 1 <= batch_size <= MAX_BATCH_SIZE:
            # Past this, the database refuses the LIMIT, which --forever would take for an
            # outage and retry for ever.
            raise CommandError(f"--batch-size must be between 1 and {MAX_BATCH_SIZE}")
        if not (0 < interval <= 86_400):  # also refuses nan; inf cannot be slept
            raise CommandError("--interval must be a positive number of seconds, at most 86400")
        if not (0 <= reconcile_every <= 86_400):
            raise CommandError("--reconcile-every must be a number of seconds from 0 to 86400")
        try:
            require("celery", "manage.py relay_outbox", "celery", "kombu")
        except MissingExtra as exc:
            raise CommandError(str(exc)) from exc
        self.alias = router.db_for_write(OutboxMessage)
        if retry_failed:
            self._retry_failed()
        if not forever:
            result = self._relay_once(batch_size)
            if result.outage is not None:
                raise CommandError(
                    f"the broker is unavailable: {outbox.describe(result.outage)}"
                ) from result.outage
            if reconcile:
                checked = self._reconcile_once(batch_size)
                if checked.outage is not None:
                    raise CommandError(
                        f"the broker is unavailable: {outbox.describe(checked.outage)}"
                    ) from checked.outage
            return
        self.stdout.write(
            f"relaying the outbox every {interval:g}s"
            + (f", reconciling every {reconcile_every:g}s" if reconcile_every else "")
            + " (Ctrl-C stops)"
        )
        try:
            self._forever(batch_size, interval, reconcile_every)
        except KeyboardInterrupt:
            self.stdout.write("stopped")

    def _retry_failed(self) -> None:
        redriven = OutboxMessage.objects.using(self.alias).failed().redrive()
        logger.warning("outbox: %d failed message(s) re-driven by relay_outbox", redriven)
        self.stdout.write(f"re-drove {redriven} failed message(s)")

    def _forever(self, batch_size: int, interval: float, reconcile_every: float) -> None:
        wait = interval
        next_check = time.monotonic()
        while True:
            try:
                if reconcile_every and time.monotonic() >= next_check:
                    # Due again after the interval whatever this run meets: a database or
                    # broker outage is the relay's to wait out, not the reconciler's.
                    next_check = time.monotonic() + reconcile_every
                    self._reconcile_once(batch_size, report_idle=False)
                result = self._relay_once(batch_size, report_idle=False)
            except DatabaseError as exc:
                # Django reconnects on the next query once the broken connection is closed.
                connections[self.alias].close_if_unusable_or_obsolete()
                self.stderr.write(f"database unavailable ({exc}); retrying in {wait:g}s")
                logger.warning("outbox relay: database unavailable: %s", exc)
            except Exception as exc:
                # Whatever else went wrong (one message's fault is handled inside the relay),
                # an exiting relay stops the whole outbox: log it and try again later.
                logger.exception("outbox relay: unexpected error")
                self.stderr.write(f"relay failed ({exc!r}); retrying in {wait:g}s")
            else:
                if result.published or result.failed:
                    wait = interval
                    if result.outage is None:
                        continue  # more may be waiting
                if result.outage is not None:
                    self.stderr.write(
                        f"broker unavailable ({outbox.describe(result.outage)}); "
                        f"retrying in {wait:g}s"
                    )
                elif result.held:
                    self.stderr.write(
                        f"{result.held} message(s) could not be published (see their "
                        f"last_error); retrying in {wait:g}s"
                    )
                else:
                    wait = interval
                    time.sleep(interval)
                    continue
            time.sleep(wait)
            wait = min(wait * 2, max(MAX_BACKOFF, interval))

    def _relay_once(self, batch_size: int, *, report_idle: bool = True) -> outbox.Relayed:
        started = time.monotonic()
        result = outbox.relay_messages(batch_size=batch_size, using=self.alias)
        if result.published or result.failed or result.held or report_idle:
            messages = OutboxMessage.objects.using(self.alias)
            pending, failed = messages.pending().count(), messages.failed().count()
            self.stdout.write(
                f"published {result.published} message(s) in "
                f"{time.monotonic() - started:.2f}s; {pending} pending, {failed} failed"
                + (f" ({result.failed} set aside just now)" if result.failed else "")
                + (f"; {result.held} could not be published, see last_error" if result.held else "")
            )
        return result

    def _reconcile_once(self, batch_size: int, *, report_idle: bool = True) -> outbox.Reconciled:
        started = time.monotonic()
        result = outbox.reconcile(batch_size=batch_size, using=self.alias)
        if result.checked or result.outage is not None or report_idle:
            self.stdout.write(
                f"reconciled in {time.monotonic() - started:.2f}s: {result.summary()}"
                + (
                    f"; stopped, the broker is unavailable: {outbox.describe(result.outage)}"
                    if result.outage is not None
                    else ""
                )
            )
        return result
