"""The app's admins, one per capability; importing them here is what registers them.

Django's admin autodiscovery imports ``idempotency.admin``; each admin lives with its model.
"""

from __future__ import annotations

# The per-event page reads every capability's records, so it sits above them; it is served
# under the inbox's admin.
from .console.admin import EventAdmin
from .console.story import event_of_key as _event_of_key
from .console.views import urls as _event_urls
from .deadletters.admin import DeadLetterAdmin
from .http.admin import IdempotencyKeyAdmin
from .inbox.admin import ProcessedEventAdmin
from .outbox.admin import OutboxMessageAdmin

ProcessedEventAdmin.extra_urls = staticmethod(_event_urls)
# A key's event: the console knows which ids its records hold, not only UUIDs.
IdempotencyKeyAdmin.event_of = staticmethod(_event_of_key)

__all__ = [
    "DeadLetterAdmin",
    "EventAdmin",
    "IdempotencyKeyAdmin",
    "OutboxMessageAdmin",
    "ProcessedEventAdmin",
]
