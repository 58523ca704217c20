from __future__ import annotations

from datetime import datetime

from django.db import models
from django.utils import timezone
from django.utils.translation import gettext_lazy as _


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


class ProcessedEvent(models.Model):
    """The inbox: one row per (consumer, event id) whose effect has been applied.

    The row is inserted in the same transaction as the business change, so it exists exactly
    when the effect does.
    """

    consumer = models.CharField(_("consumer"), max_length=200)
    event_id = models.CharField(_("event id"), max_length=255)
    processed_at = models.DateTimeField(_("processed at"), default=timezone.now)
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
    result = models.JSONField(_("result"), null=True, blank=True)
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
        help_text=_("The first delivery's payload; kept only when STORE_PAYLOADS is on."),
    )
    mismatch_payload = models.JSONField(
        _("mismatched payload"),
        null=True,
        blank=True,
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
