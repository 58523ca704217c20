"""The inbox's retention: the cut-off of each consumer, and the batches a purge sweeps.

``ProcessedEvent.objects.purge()`` (``manage.py purge_processed_events``, the
``purge_processed_events`` task) builds on these; the other records that share the inbox's
retention are purged by :mod:`idempotency.purging`.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from functools import reduce
from typing import TYPE_CHECKING, NamedTuple

from django.db import DEFAULT_DB_ALIAS, models, router, transaction

from ..clock import database_now
from ..conf import app_settings

if TYPE_CHECKING:
    from .models import ProcessedEvent


class PurgeBatch(NamedTuple):
    """One committed batch of a purge."""

    #: Records the batch deleted.
    deleted: int
    #: Ids swept so far, out of *span*: the purge's progress.
    swept: int
    span: int


class RetentionCutoffs(NamedTuple):
    """Per consumer, the time before which its records may go (``None``: kept forever)."""

    #: For every consumer not in *consumers*.
    others: datetime | None
    consumers: dict[str, datetime | None]

    def latest(self) -> datetime:
        return max(c for c in (self.others, *self.consumers.values()) if c is not None)


#: How many of the newest expired records are read to find where a purge's sweep ends. Ids
#: follow processed_at except among claims made moments apart, whose order may differ.
PURGE_TAIL_WINDOW = 1000


def retention_cutoffs(
    before: datetime | None = None,
    *,
    consumer: str | None = None,
    now: datetime | None = None,
    using: str | None = None,
) -> RetentionCutoffs:
    """The cutoffs of a purge: *before*, or ``now - retention``, per consumer.

    Without *now*, "now" is the clock of the database *using* (the inbox's write database by
    default), the clock ``processed_at`` is taken from: a purging process whose own clock runs
    ahead cannot delete records early. It is read only when a cutoff needs it.
    """
    clock: list[datetime] = [now] if now is not None else []

    def current() -> datetime:
        if not clock:
            from .models import ProcessedEvent

            alias = using or router.db_for_write(ProcessedEvent) or DEFAULT_DB_ALIAS
            clock.append(database_now(alias))
        return clock[0]

    def cutoff(retention: timedelta | None) -> datetime | None:
        return None if retention is None else current() - retention

    if consumer is not None:
        retention = app_settings.retention_for(consumer)
        only = None if retention is None else (before or current() - retention)
        return RetentionCutoffs(others=None, consumers={consumer: only})
    overrides: dict[str, timedelta | None] = app_settings.CONSUMER_RETENTION
    others = before or cutoff(app_settings.RETENTION)
    if app_settings.RETENTION is None:
        others = None  # an explicit *before* does not purge what the settings keep forever
    return RetentionCutoffs(
        others=others, consumers={name: cutoff(value) for name, value in overrides.items()}
    )


def _retention_condition(cutoffs: RetentionCutoffs) -> models.Q | None:
    parts = [
        models.Q(consumer=name, processed_at__lt=cutoff)
        for name, cutoff in cutoffs.consumers.items()
        if cutoff is not None
    ]
    if cutoffs.others is not None:
        others = models.Q(processed_at__lt=cutoffs.others)
        if cutoffs.consumers:
            others &= ~models.Q(consumer__in=list(cutoffs.consumers))
        parts.append(others)
    return reduce(operator.or_, parts) if parts else None


def _sweep_span(table: models.QuerySet[ProcessedEvent], latest: datetime) -> tuple[int, int] | None:
    """The id range a purge sweeps: from the oldest record to the newest expired one.

    Both ends are index lookups. An expired record with an id above the end (a claim that
    took its id after a later one's, a backdated import) is left to a later purge.
    """
    first = table.order_by("pk").values_list("pk", flat=True).first()
    newest = table.filter(processed_at__lt=latest).order_by("-processed_at")
    tail = list(newest.values_list("pk", flat=True)[:PURGE_TAIL_WINDOW])
    if first is None or not tail:
        return None
    return first, max(tail)


@contextmanager
def _batch_transaction(using: str) -> Iterator[None]:
    """One purge batch's transaction.

    On PostgreSQL its commit does not wait for the WAL flush: a batch lost in a crash only
    leaves expired records to the next purge. Never so inside a transaction of the caller's,
    whose durability is not the purge's to change.
    """
    connection = transaction.get_connection(using)
    outermost = not connection.in_atomic_block
    with transaction.atomic(using=using):
        if outermost and connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute("SET LOCAL synchronous_commit TO OFF")
        yield
