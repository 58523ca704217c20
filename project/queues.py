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


def work_queue(name: str) -> Queue:
    """A durable queue whose rejected messages RabbitMQ routes to ``<name>.dead``.

    Redis and the filesystem transport ignore the arguments; they have no dead-lettering of their
    own, so the app's database dead letters cover them.
    """
    return Queue(
        name,
        Exchange(name, type="direct", durable=True),
        routing_key=name,
        durable=True,
        queue_arguments={
            "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
            "x-dead-letter-routing-key": f"{name}.dead",
        },
    )
