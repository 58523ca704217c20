"""Consumers outside Celery: a service's own loop over a broker, with the inbox's guarantee.

A message leaves the broker only once its outcome is durable: the handler runs inside
:class:`~idempotency.inbox.idempotent` (claim and effect in one transaction), and the message is
acknowledged after that transaction commits, or after its dead letter is stored; otherwise it
goes back to the broker. See docs/consumers.md.

- :mod:`.processing`: :class:`EventConsumer`, the broker-neutral core (:class:`Delivery` in,
  :class:`Outcome` out), which the adapters and a hand-written loop (Kafka) share.
- :mod:`.publishing`: :func:`derived_event_id`, the id of a message a consumer emits.
- :mod:`.kombu`: :class:`KombuConsumer`, a ``kombu.Consumer`` loop (RabbitMQ, Redis, SQS).
- :mod:`.nats`: :class:`JetStreamConsumer`, a NATS JetStream pull consumer (needs ``nats-py``).

``manage.py consume_events`` runs either adapter's loop with a graceful stop on SIGTERM.
The adapters are loaded on first use, so the core needs neither kombu nor nats-py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..faces import lazy_names
from .processing import Decision, Delivery, EventConsumer, Outcome
from .publishing import derived_event_id

if TYPE_CHECKING:
    from .kombu import KombuConsumer
    from .nats import JetStreamConsumer

_ADAPTERS = {"KombuConsumer": ".kombu", "JetStreamConsumer": ".nats"}

__all__ = [
    "Decision",
    "Delivery",
    "EventConsumer",
    "JetStreamConsumer",
    "KombuConsumer",
    "Outcome",
    "derived_event_id",
]


__getattr__, __dir__ = lazy_names(__name__, _ADAPTERS)
