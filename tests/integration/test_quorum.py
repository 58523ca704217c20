"""``CELERY_QUEUE_TYPE=quorum``: the work queue as a RabbitMQ quorum queue with a delivery limit."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from io import StringIO

import pytest
from django.core.management import call_command
from kombu import Connection

from idempotency.models import DeadLetter
from orders.tasks import place_order
from project.queues import dead_letter_queue, work_queue
from tests.factories import place_order_event
from tests.services import AMQP_URL, require_broker, wait_for

pytestmark = [pytest.mark.services]

LIMIT = 2


@pytest.fixture
def quorum_queue() -> Iterator[str]:
    require_broker(AMQP_URL)
    name = f"test-quorum-{uuid.uuid4().hex[:12]}"
    with Connection(AMQP_URL) as conn:
        for queue in (work_queue(name, "quorum", delivery_limit=LIMIT), dead_letter_queue(name)):
            queue.bind(conn.default_channel).declare()
    yield name
    with Connection(AMQP_URL) as conn:
        for queue in (work_queue(name, "quorum"), dead_letter_queue(name)):
            queue.bind(conn.default_channel).delete()


def test_the_arguments() -> None:
    queue = work_queue("orders", "quorum", delivery_limit=5)
    assert queue.queue_arguments == {
        "x-dead-letter-exchange": "dead-letters",
        "x-dead-letter-routing-key": "orders.dead",
        "x-queue-type": "quorum",
        "x-delivery-limit": 5,
    }
    assert queue.exchange.type == "topic", "Celery's native delayed delivery needs it"
    classic = work_queue("orders")
    assert "x-queue-type" not in classic.queue_arguments
    assert classic.exchange.type == "direct"


@pytest.mark.parametrize(
    ("queue_type", "limit", "error", "match"),
    [
        ("stream", 5, ValueError, "queue type must be one of classic, quorum, not 'stream'"),
        ("", 5, ValueError, "queue type must be one of"),
        ("quorum", 0, ValueError, "delivery_limit must be at least 1, not 0"),
        ("quorum", -1, ValueError, "delivery_limit must be at least 1"),
        ("quorum", True, TypeError, "delivery_limit must be an int"),
        ("quorum", "5", TypeError, "delivery_limit must be an int"),
        ("quorum", 10**30, ValueError, "x-delivery-limit fits in 32 bits"),
    ],
)
def test_bad_types_and_limits_are_refused(
    queue_type: str, limit: object, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        work_queue("orders", queue_type, delivery_limit=limit)  # type: ignore[arg-type]


@pytest.mark.django_db
def test_n_plus_one_deliveries_then_a_dead_letter_delivery_limit(quorum_queue: str) -> None:
    """``x-delivery-limit`` 2: three deliveries given back, then RabbitMQ dead-letters the message
    (reason ``delivery_limit``); ``dead_letters import`` makes it a dead letter."""
    event = place_order_event()
    with Connection(AMQP_URL) as conn:
        queue = work_queue(quorum_queue, "quorum", delivery_limit=LIMIT)
        result = place_order.apply_async(args=[event], queue=queue, connection=conn)
        bound = queue.bind(conn.default_channel)
        counts = []
        for _ in range(LIMIT + 1):
            message = None

            def got() -> bool:
                nonlocal message
                message = bound.get(no_ack=False)
                return message is not None

            wait_for(got, 10, "the message to be delivered again")
            assert message is not None
            counts.append(message.headers.get("x-delivery-count"))
            message.reject(requeue=True)
        # RabbitMQ 3.10 sends the header at 0 on the first delivery; the app reads 0 as "first".
        assert counts[0] in (None, 0), counts
        assert counts[1:] == [1, 2], counts
        dead = dead_letter_queue(quorum_queue).bind(conn.default_channel)
        wait_for(lambda: dead.queue_declare(passive=True).message_count == 1, 10, "a dead letter")
        assert bound.get(no_ack=True) is None, "nothing left in the work queue"
    out = StringIO()
    dead_queue = f"{quorum_queue}.dead"
    call_command("dead_letters", "import", "--broker", AMQP_URL, "--queue", dead_queue, stdout=out)
    assert f"{quorum_queue}.dead: imported 1 dead letter(s)" in out.getvalue(), out.getvalue()
    letter = DeadLetter.objects.get(task_id=result.id)
    assert letter.reason == DeadLetter.Reason.BROKER
    assert "delivery_limit" in letter.exception, letter.exception
    assert letter.args == [event]
