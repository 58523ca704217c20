"""The records that share the inbox's retention: HTTP idempotency keys and sent outbox messages."""

from __future__ import annotations

from datetime import datetime

from .conf import app_settings
from .models import IdempotencyKey, OutboxMessage


def purge_other_records(
    *, before: datetime | None, now: datetime, batch_size: int, using: str
) -> dict[str, int]:
    """Delete them past ``RETENTION`` (or *before*); the number deleted per kind.

    Unpublished outbox messages are never deleted, however old: they are events still owed.
    """
    retention = app_settings.RETENTION
    cutoff = before if before is not None else (None if retention is None else now - retention)
    if cutoff is None:
        return {}
    keys = IdempotencyKey.objects.using(using)
    messages = OutboxMessage.objects.using(using)
    return {
        "HTTP idempotency keys": keys.purge(before=cutoff, batch_size=batch_size),
        "published outbox messages": messages.purge_published(before=cutoff, batch_size=batch_size),
    }
