"""The HTTP keys' table: one row per (owner, endpoint, key), holding the stored response."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from datetime import datetime

from django.db import DEFAULT_DB_ALIAS, models, router, transaction
from django.db.models.functions import Now
from django.utils.translation import gettext_lazy as _

from ..fields import ExactCharField


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

    owner = ExactCharField(
        _("owner"), max_length=OWNER_LENGTH, help_text=_("Whom the key belongs to (the user's pk).")
    )
    endpoint = ExactCharField(
        _("endpoint"), max_length=ENDPOINT_LENGTH, help_text=_("The HTTP method and URL route.")
    )
    key = ExactCharField(_("idempotency key"), max_length=255)
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
