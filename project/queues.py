"""The work queue and its dead-letter queue, declared the same way by producers and workers."""

from __future__ import annotations

from kombu import Exchange, Queue

DEAD_LETTER_EXCHANGE = "dead-letters"


def dead_letter_queue(name: str) -> Queue:
    return Queue(
        f"{name}.dead",
        Exchange(DEAD_LETTER_EXCHANGE, type="direct", durable=True),
        routing_key=f"{name}.dead",
        durable=True,
    )


#: RabbitMQ queue types the example declares (CELERY_QUEUE_TYPE).
QUEUE_TYPES = ("classic", "quorum")
#: A quorum queue dead-letters a message after this many redeliveries (x-delivery-limit).
DEFAULT_DELIVERY_LIMIT = 20
MAX_DELIVERY_LIMIT = 2**31 - 1


def work_queue(
    name: str, queue_type: str = "classic", delivery_limit: int = DEFAULT_DELIVERY_LIMIT
) -> Queue:
    """A durable queue whose rejected messages RabbitMQ routes to ``<name>.dead``.

    ``queue_type="quorum"``: a RabbitMQ quorum queue with ``x-delivery-limit``: a message
    delivered ``delivery_limit + 1`` times without an outcome (one that kills its worker on every
    delivery) is dead-lettered with reason ``delivery_limit`` instead of being redelivered for
    ever, as a classic queue would. Its exchange is a topic exchange, so Celery delays countdown
    retries in RabbitMQ (native delayed delivery, which quorum queues need) rather than in the
    worker. A queue's type cannot change: a quorum queue needs a name (or vhost) of its own.

    Redis, SQS and the filesystem transport ignore the arguments; the app's database dead letters
    cover them (and SQS's redrive policy, idempotency.celery.sqs.declare_queues).
    """
    if queue_type not in QUEUE_TYPES:
        raise ValueError(f"queue type must be one of {', '.join(QUEUE_TYPES)}, not {queue_type!r}")
    arguments: dict[str, object] = {
        "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
        "x-dead-letter-routing-key": f"{name}.dead",
    }
    exchange_type = "direct"
    if queue_type == "quorum":
        if isinstance(delivery_limit, bool) or not isinstance(delivery_limit, int):
            raise TypeError(f"delivery_limit must be an int, not {delivery_limit!r}")
        if delivery_limit < 1:
            raise ValueError(f"delivery_limit must be at least 1, not {delivery_limit}")
        if delivery_limit > MAX_DELIVERY_LIMIT:
            raise ValueError(
                f"delivery_limit must be at most {MAX_DELIVERY_LIMIT} (x-delivery-limit fits in "
                f"32 bits), not {delivery_limit}"
            )
        arguments.update({"x-queue-type": "quorum", "x-delivery-limit": delivery_limit})
        exchange_type = "topic"
    return Queue(
        name,
        Exchange(name, type=exchange_type, durable=True),
        routing_key=name,
        durable=True,
        queue_arguments=arguments,
    )
