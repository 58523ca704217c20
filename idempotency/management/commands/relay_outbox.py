"""Publish the outbox's pending messages: once, or continuously as a relay process."""

from __future__ import annotations

import time
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from idempotency import outbox
from idempotency.models import OutboxMessage


class Command(BaseCommand):
    help = (
        "Publish pending outbox messages to the broker. With --forever it keeps relaying, "
        "waiting --interval seconds when there is nothing to do or the broker is away."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--forever", action="store_true", help="keep relaying until stopped")
        parser.add_argument("--interval", type=float, default=1.0, help="seconds between polls")
        parser.add_argument("--batch-size", type=int, default=100, help="messages per transaction")

    def handle(self, *args: Any, forever: bool, interval: float, batch_size: int, **options: Any):  # type: ignore[no-untyped-def]
        if batch_size < 1:
            raise CommandError("--batch-size must be at least 1")
        if interval <= 0:
            raise CommandError("--interval must be positive")
        if not forever:
            self._relay_once(batch_size, raise_errors=True)
            return
        self.stdout.write(f"relaying the outbox every {interval:g}s (Ctrl-C stops)")
        try:
            while True:
                if not self._relay_once(batch_size, raise_errors=False):
                    time.sleep(interval)
        except KeyboardInterrupt:
            self.stdout.write("stopped")

    def _relay_once(self, batch_size: int, *, raise_errors: bool) -> int:
        started = time.monotonic()
        try:
            published = outbox.relay(batch_size=batch_size)
        except outbox.broker_errors() as exc:
            if raise_errors:
                raise CommandError(f"the broker refused a message: {exc}") from exc
            self.stderr.write(f"broker unavailable ({exc}); retrying")
            return 0
        pending = OutboxMessage.objects.pending().count()
        if published or raise_errors:
            self.stdout.write(
                f"published {published} message(s) in {time.monotonic() - started:.2f}s; "
                f"{pending} pending"
            )
        return published
