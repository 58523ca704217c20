"""The records that share the inbox's retention: HTTP idempotency keys, sent outbox messages and
the delivery counters of redelivered messages."""

from __future__ import annotations

from datetime import datetime

from .conf import app_settings
from .models import DeliveryAttempt, IdempotencyKey, OutboxMessage


def purge_other_records(
    *, before: datetime | None, now: datetime, batch_size: int, using: str
) -> dict[str, int]:
    """Delete them past ``RETENTION`` (or *before*); the number deleted per kind.

    *now* should be the database's clock (:func:`idempotency.clock.database_now`), which stamped
    the records. An explicit *before* never purges what the settings keep forever: with
    ``RETENTION = None`` nothing is deleted, as the inbox's own purge does. Unpublished outbox
    messages are never deleted, however old: they are events still owed.
    """
    retention = app_settings.RETENTION
    if retention is None:
        return {}
    cutoff = before if before is not None else now - retention
    keys = IdempotencyKey.objects.using(using)
    messages = OutboxMessage.objects.using(using)
    attempts = DeliveryAttempt.objects.using(using)
    return {
        "HTTP idempotency keys": keys.purge(before=cutoff, batch_size=batch_size),
        "published outbox messages": messages.purge_published(
            before=cutoff, open_before=now - retention, batch_size=batch_size
        ),
        "delivery counters": attempts.purge(before=cutoff, batch_size=batch_size),
    }
