"""The outbox's table: one row per task message, stored with the business data."""

from __future__ import annotations

import uuid
from datetime import datetime

from django.db import DEFAULT_DB_ALIAS, models, router, transaction
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from ..fields import ExactCharField, UUIDPrefix


class OutboxMessageQuerySet(models.QuerySet["OutboxMessage"]):
    def pending(self) -> OutboxMessageQuerySet:
        """Still to publish: neither published nor failed for good."""
        return self.filter(published_at__isnull=True, failed_at__isnull=True)

    def failed(self) -> OutboxMessageQuerySet:
        """Refused for a reason that will not go away by itself (see ``last_error``)."""
        return self.filter(published_at__isnull=True, failed_at__isnull=False)

    def unreconciled(self) -> OutboxMessageQuerySet:
        """Published, and no outcome of their event seen yet by the reconciler."""
        return self.filter(published_at__isnull=False, reconciled_at__isnull=True)

    def redrive(self) -> int:
        """Put the failed messages among these back in the relay's queue; the number.

        Clears ``failed_at`` on the write alias and keeps ``last_error`` and ``attempts``, so
        a message that fails again shows its history. Fix the cause first (a queue missing
        from the settings, a bad option), or it is set aside again at its next publish. One
        the reconciler set aside gets its republishes back.
        """
        using = getattr(self, "_db", None) or router.db_for_write(self.model) or DEFAULT_DB_ALIAS
        return self.using(using).failed().update(failed_at=None, republished=0)

    def purge_published(
        self, *, before: datetime, open_before: datetime | None = None, batch_size: int = 1000
    ) -> int:
        """Delete the messages published before *before*, a batch per transaction.

        Those the reconciler has not closed yet go only if published before *open_before*
        (default: *before*): a purge with a cut-off earlier than the retention would take
        a message the broker lost before its check, and with it the only trace of that loss.
        """
        using = getattr(self, "_db", None) or router.db_for_write(self.model) or DEFAULT_DB_ALIAS
        published = self.using(using).filter(published_at__lt=before)
        if open_before is not None and open_before < before:
            published = published.filter(
                models.Q(reconciled_at__isnull=False) | models.Q(published_at__lt=open_before)
            )
        published = published.order_by("pk")
        deleted = 0
        while pks := list(published.values_list("pk", flat=True)[:batch_size]):
            with transaction.atomic(using=using):
                deleted += published.filter(pk__gte=pks[0], pk__lte=pks[-1]).delete()[0]
        return deleted


class OutboxMessage(models.Model):
    """A task message stored in the producer's transaction, published by the relay afterwards.

    ``transaction.on_commit`` alone loses the message if the process dies after the commit or
    the broker is down; a row committed with the business data cannot be lost that way.
    """

    task_id = models.UUIDField(_("task id"), default=uuid.uuid4, unique=True, editable=False)
    task_name = models.CharField(_("task"), max_length=200)
    args = models.JSONField(_("arguments"), default=list)
    kwargs = models.JSONField(_("keyword arguments"), default=dict)
    options = models.JSONField(_("publish options"), default=dict, blank=True)
    event_id = ExactCharField(_("event id"), max_length=255, blank=True, db_index=True)
    created_at = models.DateTimeField(_("stored at"), default=timezone.now)
    published_at = models.DateTimeField(
        _("published at"),
        null=True,
        blank=True,
        help_text=_("The last publish: the reconciler's republish moves it."),
    )
    attempts = models.PositiveIntegerField(_("publish attempts"), default=0)
    last_error = models.TextField(_("last error"), blank=True)
    failed_at = models.DateTimeField(
        _("failed at"),
        null=True,
        blank=True,
        help_text=_("Set when a publish failed for a reason retrying cannot fix; re-drive it."),
    )
    reconciled_at = models.DateTimeField(
        _("reconciled at"),
        null=True,
        blank=True,
        help_text=_(
            "When the reconciler closed the row: its event's outcome seen, or nothing here "
            "able to tell it (see the log)."
        ),
    )
    republished = models.PositiveIntegerField(
        _("republished"),
        default=0,
        help_text=_("Times the reconciler published it again: no outcome of its event was seen."),
    )

    objects = OutboxMessageQuerySet.as_manager()

    class Meta:
        verbose_name = _("outbox message")
        verbose_name_plural = _("outbox messages")
        indexes = [
            # The relay's scan: the pending rows only, oldest first.
            models.Index(
                fields=["id"],
                name="idempotency_outbox_pending",
                condition=models.Q(published_at__isnull=True),
            ),
            # The reconciler's scan: the published rows whose outcome it has not seen yet.
            models.Index(
                fields=["published_at", "id"],
                name="idempotency_outbox_unchecked",
                condition=models.Q(published_at__isnull=False, reconciled_at__isnull=True),
            ),
        ]

    def __str__(self) -> str:
        return f"{self.task_name} {self.event_id or self.task_id}"


# task_id__prefix="a1b2": the admin's search, a range of the unique index.
OutboxMessage._meta.get_field("task_id").register_lookup(UUIDPrefix)
