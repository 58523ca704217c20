"""Dead letters: the messages that can never succeed as they are, kept, and re-driven.

- :mod:`.store`: ``record()``, the last resort of a worker that could not process a message
  (never raises; ``None`` means nothing was stored), and the reasons (``FAILED``,
  ``DELIVERY_LIMIT``, ...).
- :mod:`.redriving`: ``redrive()``, publishing letters again through the outbox, once each, and
  what it did (``Redrive``: done, skipped, refused, each ``Refusal`` with its reason).
- :mod:`.broker`: ``import_broker_queue()``, a RabbitMQ dead-letter queue into rows.
- :mod:`.models`: ``DeadLetter``, and ``DeliveryAttempt``, the durable delivery counter that
  turns a message redelivered past ``DELIVERY_LIMIT`` into a dead letter.
- :mod:`.admin`: the read-only admin and its logged re-drive.

The worker consumer that dead-letters undecodable messages and unknown tasks is Celery's:
``idempotency.celery:DeadLetterConsumer``.

The names below are loaded on first use: ``idempotency.models`` imports
``idempotency.deadletters.models``, which runs this file before the app registry is ready.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..faces import lazy_names

if TYPE_CHECKING:
    from .broker import (
        BrokerImport,
        BrokerMessage,
        dead_letter_queue_names,
        decode_broker_message,
        import_broker_queue,
    )
    from .redriving import Redrive, Refusal, redrive
    from .store import (
        BROKER,
        DELIVERY_LIMIT,
        FAILED,
        INVALID_EVENT,
        INVALID_KEY,
        UNDECODABLE,
        UNKNOWN_TASK,
        database,
        record,
    )

#: Public name -> the module of this package that defines it.
_PUBLIC = {
    "BROKER": ".store",
    "DELIVERY_LIMIT": ".store",
    "FAILED": ".store",
    "INVALID_EVENT": ".store",
    "INVALID_KEY": ".store",
    "UNDECODABLE": ".store",
    "UNKNOWN_TASK": ".store",
    "database": ".store",
    "record": ".store",
    "redrive": ".redriving",
    "Redrive": ".redriving",
    "Refusal": ".redriving",
    "BrokerImport": ".broker",
    "BrokerMessage": ".broker",
    "dead_letter_queue_names": ".broker",
    "decode_broker_message": ".broker",
    "import_broker_queue": ".broker",
}

__all__ = [
    "BROKER",
    "DELIVERY_LIMIT",
    "FAILED",
    "INVALID_EVENT",
    "INVALID_KEY",
    "UNDECODABLE",
    "UNKNOWN_TASK",
    "BrokerImport",
    "BrokerMessage",
    "Redrive",
    "Refusal",
    "database",
    "dead_letter_queue_names",
    "decode_broker_message",
    "import_broker_queue",
    "record",
    "redrive",
]


__getattr__, __dir__ = lazy_names(__name__, _PUBLIC)
