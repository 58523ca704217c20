"""The app's admins, one per capability; importing them here is what registers them.

Django's admin autodiscovery imports ``idempotency.admin``; each admin lives with its model.
"""

from __future__ import annotations

from .deadletters.admin import DeadLetterAdmin
from .http.admin import IdempotencyKeyAdmin
from .inbox.admin import ProcessedEventAdmin
from .outbox.admin import OutboxMessageAdmin

__all__ = [
    "DeadLetterAdmin",
    "IdempotencyKeyAdmin",
    "OutboxMessageAdmin",
    "ProcessedEventAdmin",
]
