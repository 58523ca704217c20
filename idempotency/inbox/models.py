"""The inbox's table: one row per (consumer, event id) whose effect has been applied."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Any

from django.core import validators
from django.core.exceptions import ValidationError
from django.core.serializers.json import DjangoJSONEncoder
from django.db import DEFAULT_DB_ALIAS, models, router
from django.db.models.functions import Now
from django.utils.translation import gettext_lazy as _

from .. import signals
from ..conf import app_settings
from ..exceptions import InvalidEvent
from ..fields import ExactCharField
from ..fingerprint import digest_hex
from .retention import (
    PurgeBatch,
    _batch_transaction,
    _retention_condition,
    _sweep_span,
    retention_cutoffs,
)


def _validate_digest(value: Any) -> None:
    try:
        digest_hex(value)
    except InvalidEvent as exc:
        raise ValidationError(str(exc), code="invalid") from None


class DigestField(models.BinaryField):
    """A SHA-256 digest stored as its 32 raw bytes (33 on disk, against 65 as hex text), read
    and written as the 64-character hex string the rest of the app uses; ``""`` is no digest.

    Lookups take the hex string too: ``filter(fingerprint="ab12...")``, ``exclude(
    mismatch_fingerprint="")``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # BinaryField limits the length of the value, which here is the 64-character hex form
        # of max_length bytes: check that form instead.
        self.validators[:] = [
            v for v in self.validators if not isinstance(v, validators.MaxLengthValidator)
        ]
        self.validators.append(_validate_digest)

    def _check_str_default_value(self) -> list[Any]:
        return []  # the default is the hex form, "" (no digest), as every value of the field

    def get_prep_value(self, value: Any) -> Any:
        value = super().get_prep_value(value)
        if value is None or isinstance(value, bytes | bytearray | memoryview):
            return value
        return bytes.fromhex(digest_hex(value))

    def from_db_value(self, value: Any, expression: Any, connection: Any) -> str | None:
        if value is None or isinstance(value, str):
            return value
        return bytes(value).hex()

    def to_python(self, value: Any) -> Any:
        # A hex string as the model holds it (BinaryField would read a string as base64).
        if isinstance(value, bytes | bytearray | memoryview):
            return bytes(value).hex()
        return value

    def value_to_string(self, obj: models.Model) -> str:
        value: str = self.value_from_object(obj)
        return value


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
        if before is not None:
            # Earlier than the retention the reconciler's look-back counts on: close the rows
            # it could otherwise republish once their records are gone, before deleting any.
            from ..outbox.reconciling import close_for_purge

            close_for_purge(cutoffs, using=using)
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


class ProcessedEvent(models.Model):
    """The inbox: one row per (consumer, event id) whose effect has been applied.

    The row is inserted in the same transaction as the business change, so it exists exactly
    when the effect does.
    """

    consumer = ExactCharField(_("consumer"), max_length=200)
    event_id = ExactCharField(_("event id"), max_length=255)
    # The database's clock, not the claiming process's: a purge compares it with the database's
    # clock too, so a worker whose clock is behind cannot have a fresh record purged.
    processed_at = models.DateTimeField(_("processed at"), db_default=Now())
    outcome = models.CharField(
        _("outcome"), max_length=16, choices=Outcome.choices, default=Outcome.PROCESSED
    )
    reason = models.TextField(_("reason"), blank=True, default="")
    fingerprint = DigestField(
        _("payload fingerprint"),
        max_length=32,
        blank=True,
        default="",
        help_text=_("SHA-256 of the canonical JSON payload of the first delivery."),
    )
    result = models.JSONField(_("result"), null=True, blank=True, encoder=DjangoJSONEncoder)
    mismatch_fingerprint = DigestField(
        _("mismatched fingerprint"),
        max_length=32,
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
