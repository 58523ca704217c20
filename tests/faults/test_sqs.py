"""The SQS scenarios of the fault-injection suite, on a local SQS emulator (``moto_server``).

The scenarios of test_scenarios.py that apply to SQS run there too (tests/faults/conftest.py
lists them); these are SQS's own: a task that outlives the queue's visibility timeout, and a
message that kills its worker on every delivery, moved to ``<queue>-dead`` by the queue's redrive
policy after ``maxReceiveCount`` receives and imported with ``manage.py dead_letters import``.
"""

from __future__ import annotations

import time

import pytest

from idempotency.models import DeadLetter, ProcessedEvent
from tests.faults.brokers import Broker, LocalSQS
from tests.faults.harness import lock_waiters
from tests.faults.ledger import DEBIT, PLACE, Events
from tests.faults.test_scenarios import NewScenario

pytestmark = [pytest.mark.faults, pytest.mark.services]

on_sqs = pytest.mark.parametrize("broker", ["sqs"], indirect=True)


@on_sqs
def test_redelivered_after_the_visibility_timeout(scenario: NewScenario, broker: Broker) -> None:
    """6. A task outlives the SQS queue's visibility timeout: SQS hands the message to another
    worker while the first still runs; the second delivery waits on the claim, then is
    discarded."""
    assert isinstance(broker, LocalSQS)
    visibility = 6
    broker.visibility_timeout = visibility
    s = scenario("6", "a task outlives the visibility timeout and is redelivered")
    events = Events(seed=6)
    first = s.worker(concurrency=1, visibility_timeout=visibility)
    for task, event in [(PLACE, events.place()), (DEBIT, events.debit())]:
        event_id = event["eventId"]
        s.arm(event_id, "handler")
        s.send(task, event)
        paused = s.paused(event_id, "handler")
        received = time.monotonic()
        assert s.broker.queue_state(s.queue).unacked == 1
        # SQS makes the message visible again once the timeout has passed since the receive.
        s.wait(
            lambda received=received: time.monotonic() - received > visibility + 1,
            visibility + 30,
            "the visibility timeout to pass",
        )
        late = s.worker(concurrency=1, visibility_timeout=visibility)
        s.wait(
            lambda pid=paused["backend_pid"]: any(p != pid for p in lock_waiters()),
            60,
            "the redelivery to wait on the claim",
        )
        runners = [p for k, _, e, p, _ in s.journal() if k == "received" and e == event_id]
        assert runners[0] in first.children(), "the first delivery ran in the first worker"
        assert runners[1] in late.children(), "the redelivery ran in the worker started late"
        s.release(event_id, "handler")
        s.wait(
            lambda event_id=event_id: s.count("finished", event_id) == s.count("received", event_id)
            and s.count("applied", event_id) == 1,
            60,
            "every delivery to finish",
        )
        assert s.count("applied", event_id) == 1
        # Each delivery after the first (a slow CPU may let the timeout pass once more) is a
        # duplicate the inbox discards.
        assert s.count("discarded", event_id) == s.count("received", event_id) - 1 >= 1
        s.stop_workers()
        first = s.worker(concurrency=1, visibility_timeout=visibility)
    s.drain()
    s.verify()


@on_sqs
def test_redrive_to_the_dead_letter_queue(scenario: NewScenario, broker: Broker) -> None:
    """19d. A handler over its hard time limit on every delivery (the pool process is killed
    each time) on a queue with ``maxReceiveCount`` 3 and the app's ``DELIVERY_LIMIT`` above it:
    after 3 receives SQS moves the message to ``<queue>-dead``; ``dead_letters import`` makes
    it one dead letter (reason ``broker``); the 20 events behind it are applied."""
    assert isinstance(broker, LocalSQS)
    receives = 3
    broker.max_receive_count = receives
    s = scenario("19d", "killed on every delivery: SQS's redrive policy, maxReceiveCount 3")
    events = Events(seed=194)
    # The worker declares the queue again at start: with the same limit.
    s.worker(concurrency=2, env={"CELERY_SQS_MAX_RECEIVE_COUNT": str(receives)})
    stuck = events.place()
    s.mark("slow", stuck["eventId"])
    # Celery's prefork pool arms the hard limit only once the soft one has passed: both set.
    s.send_all([(PLACE, stuck, None)], time_limit=2, soft_time_limit=1)
    s.send_all([(PLACE, events.place(), None) for _ in range(10)])
    s.send_all([(DEBIT, events.debit(), None) for _ in range(10)])
    s.ledger.expect_dead_letter(PLACE, stuck["eventId"])
    s.wait_applied(timeout=180)
    s.wait(lambda: s.broker.queue_state(s.queue).dead == 1, 120, "the message in <queue>-dead")
    (moved,) = broker.dead_messages(s.queue)
    assert int(moved["Attributes"]["ApproximateReceiveCount"]) >= receives, moved["Attributes"]
    assert not DeadLetter.objects.exists(), "the app's DELIVERY_LIMIT (10) was not reached"
    result = s.manage("dead_letters", "import")
    assert result.returncode == 0, result.stderr
    assert "imported 1 dead letter(s)" in result.stdout, result.stdout
    s.drain(until=lambda: DeadLetter.objects.filter(event_id=stuck["eventId"]).exists())
    s.verify()
    letter = DeadLetter.objects.get(event_id=stuck["eventId"])
    assert letter.reason == DeadLetter.Reason.BROKER, letter.reason
    assert letter.task_name == PLACE
    assert s.count("slow", stuck["eventId"]) == receives, "one killed run per receive"
    assert s.count("applied", stuck["eventId"]) == 0
    assert not ProcessedEvent.objects.filter(event_id=stuck["eventId"]).exists()
    assert broker.queue_state(s.queue).dead == 0, "the import took it out of <queue>-dead"
