"""The inbox: claim (consumer, event id) in the same transaction as the effect.

The one primitive the rest of the app is a thin layer over (the Celery decorator, the handler
decorator, the entity helpers).

- :mod:`.claiming`: ``idempotent`` (the claim as a context manager), ``claim``, ``reject``,
  ``current_claim``, ``inbox_database``.
- :mod:`.statements`: the claim's SQL, the fastest correct statement per database backend.
- :mod:`.models`: ``ProcessedEvent``, its queryset (``for_consumer``, ``expired``, ``purge``).
- :mod:`.retention`: the cut-offs of each consumer and the batches a purge sweeps.
- :mod:`.admin`: the read-only audit admin.

The names below are loaded on first use: ``idempotency.models`` imports
``idempotency.inbox.models``, which runs this file before the app registry is ready.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..faces import lazy_names

if TYPE_CHECKING:
    from .claiming import claim, current_claim, idempotent, inbox_database, reject

#: Public name -> the module of this package that defines it.
_PUBLIC = {
    "claim": ".claiming",
    "current_claim": ".claiming",
    "idempotent": ".claiming",
    "inbox_database": ".claiming",
    "reject": ".claiming",
}

__all__ = ["claim", "current_claim", "idempotent", "inbox_database", "reject"]


__getattr__, __dir__ = lazy_names(__name__, _PUBLIC)
