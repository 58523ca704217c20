"""A transactional outbox for Celery tasks: nothing is lost between the commit and the publish.

``enqueue()`` stores the task message in the caller's transaction. After the commit, the
messages that transaction stored are published at once, best effort: one short, bounded attempt
(``PUBLISH_TIMEOUT``) for all of them, skipped altogether while a recent failure keeps the
process's circuit breaker open (``PUBLISH_BREAKER_COOLDOWN``). Whatever that misses (the broker
was down, the process died) is published by the relay: ``manage.py relay_outbox`` or the
``relay_outbox`` Celery beat task. Relaying is at least once (a crash between publish and mark
publishes again), which the consumers' inbox absorbs.

A message the broker cannot take for a reason that retrying will not fix (a queue no longer
configured, an option the serializer or the transport rejects) is marked failed (``failed_at``,
``last_error``) and the relay goes on with the others; ``OutboxMessage.objects.redrive()`` (the
admin action, ``relay_outbox --retry-failed``) puts it back once the cause is fixed. A broker
outage stops a batch and leaves its messages pending. Every write, lock and transaction is on
the router's write alias. See docs/outbox.md.

Where each part lives: :mod:`.store` (``enqueue``), :mod:`.publish` (the immediate publish
and its breaker, ``publisher``), :mod:`.relaying` (``relay``, ``relay_messages``),
:mod:`.reconciling` (``reconcile``: a published message whose event shows no outcome is
published again), :mod:`.models` (``OutboxMessage``), :mod:`.admin`.

The names below are loaded on first use: ``idempotency.models`` imports
``idempotency.outbox.models``, which runs this file, and that must work without Celery (an
optional dependency) and before the app registry is ready.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..faces import lazy_names

if TYPE_CHECKING:
    from .publish import IDLE_CONNECTIONS, publish_now, publisher
    from .reconciling import Reconciled, reconcile
    from .relaying import Relayed, describe, is_outage, relay, relay_messages
    from .store import enqueue

#: Public name -> the module of this package that defines it.
_PUBLIC = {
    "enqueue": ".store",
    "IDLE_CONNECTIONS": ".publish",
    "publish_now": ".publish",
    "publisher": ".publish",
    "Relayed": ".relaying",
    "describe": ".relaying",
    "is_outage": ".relaying",
    "relay": ".relaying",
    "relay_messages": ".relaying",
    "Reconciled": ".reconciling",
    "reconcile": ".reconciling",
}

__all__ = [
    "IDLE_CONNECTIONS",
    "Reconciled",
    "Relayed",
    "describe",
    "enqueue",
    "is_outage",
    "publish_now",
    "publisher",
    "reconcile",
    "relay",
    "relay_messages",
]


__getattr__, __dir__ = lazy_names(__name__, _PUBLIC)
