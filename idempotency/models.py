from __future__ import annotations

import hashlib
import operator
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from functools import reduce
from typing import NamedTuple

from django.core.serializers.json import DjangoJSONEncoder
from django.db import DEFAULT_DB_ALIAS, models, router, transaction
from django.db.models.functions import Now
from django.utils.translation import gettext_lazy as _

from . import signals
from .clock import database_now
from .conf import app_settings

# The models of each capability live with it; importing them here is what registers them
# with Django (app label "idempotency") and keeps ``idempotency.models.<Model>`` working.
from .deadletters.models import (
    DeadLetter,
    DeadLetterQuerySet,
    DeliveryAttempt,
    DeliveryAttemptQuerySet,
)
from .outbox.models import OutboxMessage, OutboxMessageQuerySet


class Outcome(models.TextChoices):
    PROCESSED = "processed", _("processed")
    REJECTED = "rejected", _("rejected")


class ProcessedEventQuerySet(models.QuerySet["ProcessedEvent"]):
    def for_consumer(self, consumer: str) -> ProcessedEventQuerySet:
        return self.filter(consumer=consumer)

    def for_event(self, event_id: str) -> ProcessedEventQuerySet:
        return self.filter(event_id=event_id)

    def expired(self, before: datetime) -> ProcessedEventQuerySet:
        return self.filter(processed_at__lt=before)

    def mismatched(self) -> ProcessedEventQuerySet:
        return self.exclude(mismatch_fingerprint="")

    def _write_alias(self) -> str:
        """The writable database, even for a queryset not yet marked for writing."""
        chosen: str | None = self._db  # type: ignore[attr-defined]
        return chosen or router.db_for_write(self.model) or DEFAULT_DB_ALIAS

    def purgeable(
        self,
        before: datetime | None = None,
        *,
        consumer: str | None = None,
        now: datetime | None = None,
    ) -> ProcessedEventQuerySet:
        """The records a purge with the same arguments deletes (see :meth:`purge_batches`)."""
        cutoffs = retention_cutoffs(before, consumer=consumer, now=now, using=self._write_alias())
        condition = _retention_condition(cutoffs)
        return self.none() if condition is None else self.filter(condition)

    def purge(
        self,
        before: datetime | None = None,
        *,
        batch_size: int | None = None,
        consumer: str | None = None,
        now: datetime | None = None,
    ) -> int:
        """Delete the records past their retention, batch by batch; the number deleted."""
        batches = self.purge_batches(before, batch_size=batch_size, consumer=consumer, now=now)
        return sum(batch.deleted for batch in batches)

    def purge_batches(
        self,
        before: datetime | None = None,
        *,
        batch_size: int | None = None,
        consumer: str | None = None,
        now: datetime | None = None,
    ) -> Iterator[PurgeBatch]:
        """Delete the records past their retention, yielding each batch once it has committed.

        Without *before*, each consumer keeps its records for ``retention_for(consumer)``;
        with it, *before* replaces ``RETENTION`` but a consumer listed in
        ``CONSUMER_RETENTION`` keeps its own retention unless it is the *consumer* purged. A
        consumer whose retention is ``None`` is never purged.

        The sweep walks the primary key from the oldest record up to the newest expired one,
        one range of *batch_size* ids per transaction: each batch is an index range scan that
        locks only the expired rows it deletes, for milliseconds, so claims go on meanwhile and
        an interrupted purge keeps the batches that committed. Inside a transaction of the
        caller's, the batches are savepoints and nothing commits before the caller does.
        """
        size = app_settings.PURGE_BATCH_SIZE if batch_size is None else batch_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"batch_size must be a positive integer, not {size!r}")
        using = self._write_alias()
        cutoffs = retention_cutoffs(before, consumer=consumer, now=now, using=using)
        condition = _retention_condition(cutoffs)
        if condition is None:
            return
        span = _sweep_span(self.model._base_manager.using(using), cutoffs.latest())
        if span is None:
            return
        first, last = span
        targets = self.using(using).filter(condition)
        label = self.model._meta.label
        start = first
        while start <= last:
            end = min(start + size, last + 1)
            with _batch_transaction(using):
                _, per_model = targets.filter(pk__gte=start, pk__lt=end).delete()
            deleted = per_model.get(label, 0)
            signals.events_purged.send(sender=self.model, count=deleted, using=using)
            yield PurgeBatch(deleted=deleted, swept=end - first, span=last + 1 - first)
            start = end


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


class ProcessedEvent(models.Model):
    """The inbox: one row per (consumer, event id) whose effect has been applied.

    The row is inserted in the same transaction as the business change, so it exists exactly
    when the effect does.
    """

    consumer = models.CharField(_("consumer"), max_length=200)
    event_id = models.CharField(_("event id"), max_length=255)
    # The database's clock, not the claiming process's: a purge compares it with the database's
    # clock too, so a worker whose clock is behind cannot have a fresh record purged.
    processed_at = models.DateTimeField(_("processed at"), db_default=Now())
    outcome = models.CharField(
        _("outcome"), max_length=16, choices=Outcome.choices, default=Outcome.PROCESSED
    )
    reason = models.TextField(_("reason"), blank=True, default="")
    fingerprint = models.CharField(
        _("payload fingerprint"),
        max_length=64,
        blank=True,
        default="",
        help_text=_("SHA-256 of the canonical JSON payload of the first delivery."),
    )
    result = models.JSONField(_("result"), null=True, blank=True, encoder=DjangoJSONEncoder)
    mismatch_fingerprint = models.CharField(
        _("mismatched fingerprint"),
        max_length=64,
        blank=True,
        default="",
        help_text=_("Fingerprint of the last delivery that reused this id with another payload."),
    )
    mismatch_at = models.DateTimeField(_("mismatch seen at"), null=True, blank=True)
    payload = models.JSONField(
        _("payload"),
        null=True,
        blank=True,
        encoder=DjangoJSONEncoder,
        help_text=_("The first delivery's payload; kept only when STORE_PAYLOADS is on."),
    )
    mismatch_payload = models.JSONField(
        _("mismatched payload"),
        null=True,
        blank=True,
        encoder=DjangoJSONEncoder,
        help_text=_(
            "The last mismatching delivery's payload; kept only when STORE_PAYLOADS is on."
        ),
    )
    duplicate_count = models.PositiveIntegerField(
        _("duplicates discarded"),
        default=0,
        help_text=_("Counted only when RECORD_DUPLICATES is on (it makes a duplicate write)."),
    )
    last_duplicate_at = models.DateTimeField(_("last duplicate at"), null=True, blank=True)

    objects = ProcessedEventQuerySet.as_manager()

    class Meta:
        verbose_name = _("processed event")
        verbose_name_plural = _("processed events")
        constraints = [
            # event_id leads so that the same index serves lookups of an event across its
            # consumers; a separate event_id index would cost every claim an extra insert.
            models.UniqueConstraint(
                fields=["event_id", "consumer"], name="idempotency_unique_consumer_event"
            ),
        ]
        indexes = [
            models.Index(fields=["processed_at"], name="idempotency_processed_at"),
        ]

    def __str__(self) -> str:
        return f"{self.consumer}: {self.event_id}"

    @property
    def has_mismatch(self) -> bool:
        return bool(self.mismatch_fingerprint)


class KeyState(models.TextChoices):
    IN_PROGRESS = "in_progress", _("in progress")
    COMPLETED = "completed", _("completed")


#: The lengths of the owner and endpoint columns of an IdempotencyKey.
OWNER_LENGTH = 150
ENDPOINT_LENGTH = 255


def fit_column(value: str, max_length: int) -> str:
    """*value*, or if it is longer than *max_length*, its head and the SHA-256 of the whole.

    Stable (the same value always gives the same result) and still unique: two long values
    that share their head differ in the hash.
    """
    if len(value) <= max_length:
        return value
    digest = hashlib.sha256(value.encode()).hexdigest()
    return f"{value[: max_length - len(digest) - 1]}#{digest}"


class IdempotencyKeyQuerySet(models.QuerySet["IdempotencyKey"]):
    def for_owner(self, owner: str) -> IdempotencyKeyQuerySet:
        """The keys of *owner*, as the owner function returned it (a long one is hashed)."""
        return self.filter(owner=IdempotencyKey.stored_owner(owner))

    def expired(self, before: datetime) -> IdempotencyKeyQuerySet:
        return self.filter(created_at__lt=before)

    def purge_batches(self, *, before: datetime, batch_size: int = 1000) -> Iterator[int]:
        """Delete the keys created before *before*, yielding each batch's count as it commits.

        Each batch is the next *batch_size* expired primary keys, deleted as one primary-key
        range in its own transaction, so no lock is held for long and an interrupted purge
        keeps what it already did.
        """
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        # The writable database: a purge must not start its transactions on a replica.
        chosen: str | None = self._db  # type: ignore[attr-defined]
        using = chosen or router.db_for_write(self.model) or DEFAULT_DB_ALIAS
        expired = self.using(using).expired(before).order_by("pk")
        after = 0
        while True:
            pks = list(expired.filter(pk__gt=after).values_list("pk", flat=True)[:batch_size])
            if not pks:
                return
            with transaction.atomic(using=using):
                count, _ = expired.filter(pk__range=(pks[0], pks[-1])).delete()
            after = pks[-1]
            yield count

    def purge(self, *, before: datetime, batch_size: int = 1000) -> int:
        """Delete the keys created before *before* in batches; the number deleted."""
        return sum(self.purge_batches(before=before, batch_size=batch_size))


class IdempotencyKey(models.Model):
    """An HTTP ``Idempotency-Key``, scoped to its owner and endpoint, and the response it got.

    The row is committed as an "in progress" marker before the view runs, then completed with
    the response in the view's own transaction. See ``idempotency.http``.
    """

    owner = models.CharField(
        _("owner"), max_length=OWNER_LENGTH, help_text=_("Whom the key belongs to (the user's pk).")
    )
    endpoint = models.CharField(
        _("endpoint"), max_length=ENDPOINT_LENGTH, help_text=_("The HTTP method and URL route.")
    )
    key = models.CharField(_("idempotency key"), max_length=255)
    fingerprint = models.CharField(
        _("request fingerprint"),
        max_length=64,
        help_text=_("SHA-256 of the method, path and canonical body of the first request."),
    )
    state = models.CharField(
        _("state"), max_length=16, choices=KeyState.choices, default=KeyState.IN_PROGRESS
    )
    created_at = models.DateTimeField(_("created at"), db_default=Now())
    locked_until = models.DateTimeField(
        _("lease ends"),
        help_text=_("Until then an unfinished request is assumed to be alive (HTTP_LEASE)."),
    )
    completed_at = models.DateTimeField(_("completed at"), null=True, blank=True)
    response_status = models.PositiveSmallIntegerField(_("response status"), null=True, blank=True)
    response_headers = models.JSONField(_("response headers"), default=dict, blank=True)
    response_body = models.BinaryField(_("response body"), default=b"", blank=True)

    objects = IdempotencyKeyQuerySet.as_manager()

    class Meta:
        verbose_name = _("idempotency key")
        verbose_name_plural = _("idempotency keys")
        constraints = [
            models.UniqueConstraint(
                fields=["owner", "endpoint", "key"], name="idempotency_unique_http_key"
            ),
        ]
        indexes = [
            models.Index(fields=["created_at"], name="idempotency_key_created_at"),
        ]

    def __str__(self) -> str:
        return f"{self.endpoint} {self.key}"

    @property
    def completed(self) -> bool:
        return self.state == KeyState.COMPLETED

    @classmethod
    def stored_owner(cls, owner: str) -> str:
        """How *owner* is stored: as it is, or hashed past the column's 150 characters."""
        return fit_column(owner, OWNER_LENGTH)

    @classmethod
    def stored_endpoint(cls, endpoint: str) -> str:
        """How *endpoint* is stored: as it is, or hashed past the column's 255 characters."""
        return fit_column(endpoint, ENDPOINT_LENGTH)


__all__ = [
    "DeadLetter",
    "DeadLetterQuerySet",
    "DeliveryAttempt",
    "DeliveryAttemptQuerySet",
    "IdempotencyKey",
    "IdempotencyKeyQuerySet",
    "KeyState",
    "OutboxMessage",
    "OutboxMessageQuerySet",
    "Outcome",
    "ProcessedEvent",
    "ProcessedEventQuerySet",
    "PurgeBatch",
    "RetentionCutoffs",
    "retention_cutoffs",
]
