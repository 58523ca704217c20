"""The dead letters' tables: the letters themselves, and the delivery counters that turn a
message redelivered past ``DELIVERY_LIMIT`` into one."""

from __future__ import annotations

from datetime import datetime

from django.db import DEFAULT_DB_ALIAS, models, router, transaction
from django.db.models.functions import Now
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from ..fields import ExactCharField


class DeadLetterQuerySet(models.QuerySet["DeadLetter"]):
    def pending(self) -> DeadLetterQuerySet:
        """Not re-driven yet."""
        return self.filter(redriven_at__isnull=True)

    def redrivable(self) -> DeadLetterQuerySet:
        """Those that name a task and carry its arguments."""
        return self.exclude(task_name="").exclude(args__isnull=True)


class DeadLetter(models.Model):
    """A message that cannot succeed as it is, kept for inspection and re-drive.

    Written by the Celery integration for every broker (RabbitMQ also dead-letters the message
    itself); ``manage.py dead_letters`` lists and re-drives them.
    """

    class Reason(models.TextChoices):
        INVALID_KEY = "invalid_key", _("no usable idempotency key")
        FAILED = "failed", _("failed for good")
        UNDECODABLE = "undecodable", _("undecodable message")
        UNKNOWN_TASK = "unknown_task", _("unknown task")
        INVALID_EVENT = "invalid_event", _("event too deep, too large or not JSON")
        DELIVERY_LIMIT = "delivery_limit", _("delivered too many times")
        BROKER = "broker", _("dead-lettered by the broker")

    reason = models.CharField(_("reason"), max_length=16, choices=Reason.choices)
    task_name = models.CharField(_("task"), max_length=200, blank=True)
    task_id = models.CharField(_("task id"), max_length=255, blank=True, db_index=True)
    event_id = ExactCharField(_("event id"), max_length=255, blank=True, db_index=True)
    args = models.JSONField(_("arguments"), null=True, blank=True)
    kwargs = models.JSONField(_("keyword arguments"), null=True, blank=True)
    body = models.TextField(_("raw body"), blank=True, help_text=_("For undecodable messages."))
    headers = models.JSONField(_("headers"), null=True, blank=True)
    exception = models.TextField(_("exception"), blank=True)
    traceback = models.TextField(_("traceback"), blank=True)
    attempts = models.PositiveIntegerField(_("attempts"), default=1)
    created_at = models.DateTimeField(_("dead-lettered at"), default=timezone.now, db_index=True)
    redriven_at = models.DateTimeField(_("re-driven at"), null=True, blank=True)
    redrive_count = models.PositiveIntegerField(_("times re-driven"), default=0)

    objects = DeadLetterQuerySet.as_manager()

    class Meta:
        verbose_name = _("dead letter")
        verbose_name_plural = _("dead letters")
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.get_reason_display()}: {self.task_name or '?'} {self.event_id}".strip()

    @property
    def can_redrive(self) -> bool:
        # Arguments kept only as text (too deep or too large for JSON) cannot be sent again.
        return bool(self.task_name) and isinstance(self.args, list)


class DeliveryAttemptQuerySet(models.QuerySet["DeliveryAttempt"]):
    def count_delivery(self, task_id: str, *, task_name: str = "", event_id: str = "") -> int:
        """Count one more delivery of *task_id* and commit it; the deliveries counted so far.

        Called for a redelivery only, so the first delivery, never written, is counted with
        it: a message's first counted delivery is its second. The row is locked while it is
        counted, so two workers that got the same message count two deliveries.
        """
        using = self._db or router.db_for_write(self.model) or DEFAULT_DB_ALIAS  # type: ignore[attr-defined]
        attempts = self.using(using)
        with transaction.atomic(using=using):
            row, created = attempts.select_for_update().get_or_create(
                task_id=task_id,
                defaults={"task_name": task_name, "event_id": event_id, "deliveries": 2},
            )
            if created:
                return row.deliveries
            attempts.filter(pk=row.pk).update(
                deliveries=models.F("deliveries") + 1, last_delivered_at=Now()
            )
            return row.deliveries + 1

    def purge(self, *, before: datetime, batch_size: int = 1000) -> int:
        """Delete the counters last written before *before*, a batch per transaction."""
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        using = self._db or router.db_for_write(self.model) or DEFAULT_DB_ALIAS  # type: ignore[attr-defined]
        expired = self.using(using).filter(last_delivered_at__lt=before).order_by("pk")
        deleted = 0
        while pks := list(expired.values_list("pk", flat=True)[:batch_size]):
            with transaction.atomic(using=using):
                deleted += expired.filter(pk__gte=pks[0], pk__lte=pks[-1]).delete()[0]
        return deleted


class DeliveryAttempt(models.Model):
    """How many times a redelivered message has reached a worker, counted durably.

    Written only for redeliveries (never for a first delivery, the hot path), in a transaction
    of its own that commits before the task runs, so a delivery that kills its worker still
    counts. Past ``DELIVERY_LIMIT`` the message is dead-lettered instead of run again.
    """

    task_id = ExactCharField(_("task id"), max_length=255, unique=True)
    task_name = models.CharField(_("task"), max_length=200, blank=True)
    event_id = ExactCharField(_("event id"), max_length=255, blank=True)
    deliveries = models.PositiveIntegerField(_("deliveries"), default=1)
    first_delivered_at = models.DateTimeField(_("first counted at"), db_default=Now())
    last_delivered_at = models.DateTimeField(_("last counted at"), db_default=Now())

    objects = DeliveryAttemptQuerySet.as_manager()

    class Meta:
        verbose_name = _("delivery attempt")
        verbose_name_plural = _("delivery attempts")
        indexes = [
            models.Index(fields=["last_delivered_at"], name="idempotency_delivery_last"),
        ]

    def __str__(self) -> str:
        return f"{self.task_name or '?'} {self.task_id}: {self.deliveries}"
