"""RabbitMQ quorum queues (``CELERY_QUEUE_TYPE=quorum``): the broker's own delivery limit.

A classic queue redelivers a message that kills its worker for ever (only the app's
``DELIVERY_LIMIT`` ends it); a quorum queue with ``x-delivery-limit`` N delivers it N+1 times,
then dead-letters it with reason ``delivery_limit`` to ``<queue>.dead``, where
``manage.py dead_letters import`` makes it a dead letter the operator sees and can re-drive.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from kombu import Connection

from idempotency.models import DeadLetter, ProcessedEvent
from project.queues import dead_letter_queue, work_queue
from tests.faults.brokers import Broker, RabbitMQ
from tests.faults.harness import TASKS, Scenario
from tests.faults.ledger import DEBIT, PLACE, Events
from tests.faults.test_scenarios import NewScenario

pytestmark = [pytest.mark.faults, pytest.mark.services]

#: x-delivery-limit of the scenario's queue: LIMIT + 1 deliveries, then the dead-letter queue.
LIMIT = 2


def _send(s: Scenario, messages: list[tuple[str, dict[str, Any]]], **options: Any) -> None:
    """Publish to the scenario's queue declared as a quorum queue, recording the ledger.

    ``Scenario.send_all`` declares a classic queue, which RabbitMQ refuses on a quorum queue of
    the same name (its arguments differ).
    """
    queue = work_queue(s.queue, "quorum", delivery_limit=LIMIT)
    with s.broker.connection() as conn:
        for task, event in messages:
            task_id = str(uuid.uuid4())
            TASKS[task].apply_async(
                args=[event], queue=queue, connection=conn, task_id=task_id, **options
            )
            s.ledger.record(task, event, task_id)


def _dead_letter_reasons(broker: RabbitMQ, name: str) -> list[str]:
    """The x-death reasons of the messages in ``<name>.dead``, given back unacknowledged."""
    reasons = []
    with Connection(broker.url) as conn:
        channel = conn.channel()
        queue = dead_letter_queue(name).bind(channel)
        while (message := queue.get(no_ack=False)) is not None:
            for death in message.headers.get("x-death") or []:
                reason = death.get("reason")
                reasons.append(reason.decode() if isinstance(reason, bytes) else str(reason))
        channel.close()  # the messages go back to the queue
    return reasons


@pytest.mark.parametrize("broker", ["rabbitmq"], indirect=True)
def test_quorum_queue_delivery_limit(scenario: NewScenario, broker: Broker) -> None:
    """19e. A handler over its hard time limit on every delivery (it swallows the soft limit;
    at the hard one billiard ends its pool process with SIGTERM, then SIGKILL if it is still
    alive 0.1 s later, and the parent requeues the message) on a quorum queue with
    ``x-delivery-limit`` 2 and the app's ``DELIVERY_LIMIT`` (10) above it: 3 deliveries, then
    RabbitMQ dead-letters it (reason ``delivery_limit``); ``dead_letters import`` makes it one
    dead letter; the 20 events behind it are applied."""
    assert isinstance(broker, RabbitMQ)
    s = scenario("19e", "killed on every delivery: a quorum queue's x-delivery-limit 2")
    events = Events(seed=195)
    quorum = {"CELERY_QUEUE_TYPE": "quorum", "CELERY_QUEUE_DELIVERY_LIMIT": str(LIMIT)}
    s.worker(concurrency=2, env=quorum)
    stuck = events.place()
    s.mark("slow", stuck["eventId"])
    # Celery's prefork pool arms the hard limit only once the soft one has passed: both set.
    _send(s, [(PLACE, stuck)], time_limit=2, soft_time_limit=1)
    _send(s, [(PLACE, events.place()) for _ in range(10)])
    _send(s, [(DEBIT, events.debit()) for _ in range(10)])
    s.ledger.expect_dead_letter(PLACE, stuck["eventId"])
    s.wait_applied(timeout=180)
    s.wait(lambda: broker.queue_state(s.queue).dead == 1, 120, "the message in <queue>.dead")
    assert s.count("slow", stuck["eventId"]) == LIMIT + 1, "x-delivery-limit N: N+1 deliveries"
    assert _dead_letter_reasons(broker, s.queue) == ["delivery_limit"]
    assert not DeadLetter.objects.exists(), "the app's DELIVERY_LIMIT (10) was not reached"

    result = s.manage("dead_letters", "import", env=quorum)
    assert result.returncode == 0, result.stderr
    assert f"{s.queue}.dead: imported 1 dead letter(s)" in result.stdout, result.stdout
    s.ledger.broker_dead = 0  # the import took it out of the dead-letter queue
    s.drain(until=lambda: DeadLetter.objects.filter(event_id=stuck["eventId"]).exists())
    s.verify()
    letter = DeadLetter.objects.get(event_id=stuck["eventId"])
    assert letter.reason == DeadLetter.Reason.BROKER, letter.reason
    assert "delivery_limit" in letter.exception, letter.exception
    assert letter.task_name == PLACE
    assert s.count("applied", stuck["eventId"]) == 0
    assert not ProcessedEvent.objects.filter(event_id=stuck["eventId"]).exists()
