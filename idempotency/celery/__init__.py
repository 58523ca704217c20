"""Celery integration: the task decorator (a thin layer over :func:`run_once`), the task base
class that decides what becomes of each delivery, and a worker consumer that dead-letters
messages no task could ever read.

The rule: a message leaves the broker (acknowledged, or rejected without requeue) only once its
outcome is durable: the effect and its inbox record committed, or a dead letter stored. So

- a transient error (the database unreachable, a serialization failure, a connection reset) is
  waited out in-process for up to ``TRANSIENT_RETRY_WINDOW``, then the message goes back to the
  broker (``Reject(requeue=True)``); it never consumes the task's retries, however long it lasts;
- a final failure (retries exhausted, an error not retried, an event that can never be
  processed, a message with no event at all) stores a dead letter, and the message is rejected
  without requeue only if the dead letter was stored; otherwise it goes back to the broker. So
  does a failure Celery reports after the task returned (a result the backend cannot encode, a
  callback that cannot be sent);
- a message delivered more than ``DELIVERY_LIMIT`` times (one that kills its worker: a hard time
  limit, an out-of-memory kill) is dead-lettered instead of being run again;
- a delivery whose claim committed is done, even if an ``on_commit`` callback raised afterwards.

Where each part lives: :mod:`.task` (``IdempotentTask``, the delivery rules above),
:mod:`.decorator` (``idempotent_task``), :mod:`.consumer` (``DeadLetterConsumer``),
:mod:`.sqs` (Amazon SQS with the rule kept: the ``sqs`` extra).

The names below are loaded on first use, as the capability packages' are: a settings module
may import :mod:`.sqs` (its transport options) before the app registry is ready.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

# The celery extra: without it, say which to install rather than fail on a bare import.
try:
    import celery  # noqa: F401
except ImportError as _exc:
    from ..extras import missing

    raise missing("celery", "idempotency.celery") from _exc

from ..faces import lazy_names

if TYPE_CHECKING:
    from ..transient import TRANSIENT_BACKOFF_FIRST, TRANSIENT_BACKOFF_MAX
    from .consumer import DeadLetterConsumer
    from .decorator import SAFE_TASK_OPTIONS, idempotent_task
    from .task import DELIVERY_COUNT_HEADER, IdempotentTask, delivery_number

#: Public name -> the module that defines it.
_PUBLIC = {
    "DELIVERY_COUNT_HEADER": ".task",
    "SAFE_TASK_OPTIONS": ".decorator",
    "TRANSIENT_BACKOFF_FIRST": "..transient",
    "TRANSIENT_BACKOFF_MAX": "..transient",
    "DeadLetterConsumer": ".consumer",
    "IdempotentTask": ".task",
    "delivery_number": ".task",
    "idempotent_task": ".decorator",
}

__all__ = [
    "DELIVERY_COUNT_HEADER",
    "SAFE_TASK_OPTIONS",
    "TRANSIENT_BACKOFF_FIRST",
    "TRANSIENT_BACKOFF_MAX",
    "DeadLetterConsumer",
    "IdempotentTask",
    "delivery_number",
    "idempotent_task",
]


__getattr__, __dir__ = lazy_names(__name__, _PUBLIC)
