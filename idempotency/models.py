"""The app's models, one module per capability; importing them here is what registers them.

Django imports ``idempotency.models`` and gives every model found through it the app label
"idempotency" (tables ``idempotency_<model>``), wherever the class is defined; it also keeps
``idempotency.models.<Model>`` working. Each model lives with its capability:
``inbox/models.py`` (ProcessedEvent), ``http/models.py`` (IdempotencyKey),
``outbox/models.py`` (OutboxMessage), ``deadletters/models.py`` (DeadLetter, DeliveryAttempt),
``console/models.py`` (Event, the admin index's entry for the per-event pages: a proxy, no table).
"""

from __future__ import annotations

from .console.models import Event
from .deadletters.models import (
    DeadLetter,
    DeadLetterQuerySet,
    DeliveryAttempt,
    DeliveryAttemptQuerySet,
)
from .http.models import (
    ENDPOINT_LENGTH,
    OWNER_LENGTH,
    IdempotencyKey,
    IdempotencyKeyQuerySet,
    KeyState,
    fit_column,
)
from .inbox.models import Outcome, ProcessedEvent, ProcessedEventQuerySet
from .inbox.retention import (
    PURGE_TAIL_WINDOW,
    PurgeBatch,
    RetentionCutoffs,
    retention_cutoffs,
)
from .outbox.models import OutboxMessage, OutboxMessageQuerySet

__all__ = [
    "ENDPOINT_LENGTH",
    "OWNER_LENGTH",
    "PURGE_TAIL_WINDOW",
    "DeadLetter",
    "DeadLetterQuerySet",
    "DeliveryAttempt",
    "DeliveryAttemptQuerySet",
    "Event",
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
    "fit_column",
    "retention_cutoffs",
]
