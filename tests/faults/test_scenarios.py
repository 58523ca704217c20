"""Scenarios 1-13 of the fault-injection suite, each on RabbitMQ and on Redis.

Each starts real ``celery worker`` processes on the PostgreSQL test database and a queue of its
own, injects its fault through ``tests/faults/hooks.py`` or from outside (SIGKILL, a broker
restart, ``pg_terminate_backend``), waits for the queue to drain, and verifies that every event's
effect exists exactly once (see ``Scenario.verify``). ``make faults`` runs them.
"""

from __future__ import annotations

import os
import random
import signal
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from django.contrib.auth.models import Permission
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from idempotency.models import DeadLetter, OutboxMessage, ProcessedEvent
from tests.factories import UserFactory
from tests.faults import consumers
from tests.faults.brokers import Broker, PrivateRedis, RabbitMQ
from tests.faults.harness import (
    Scenario,
    backend,
    gone,
    idle_backends,
    lock_waiters,
    producing_to,
    terminate_backend,
)
from tests.faults.ledger import DEBIT, PAY, PLACE, SHIP, Events, inspect

pytestmark = [pytest.mark.faults, pytest.mark.services]

NewScenario = Callable[[str, str], Scenario]


def test_same_event_published_three_times(scenario: NewScenario) -> None:
    """1. The same message (one task id) three times back to back, for every event type."""
    s = scenario("1", "the same event published 3 times back to back")
    events = Events(seed=1)
    s.worker(concurrency=2)
    orders = [events.place() for _ in range(3)]
    phases = [
        [(PLACE, e) for e in orders],
        [(PAY, events.pay(e)) for e in orders] + [(DEBIT, events.debit()) for _ in range(3)],
        [(SHIP, events.ship(e)) for e in orders],
    ]
    for phase in phases:
        for task, event in phase:
            task_id = f"same-{event['eventId']}"
            s.send_all([(task, event, task_id)] * 3)
        s.wait_applied()
    s.drain()
    s.verify()
    for task, event in (pair for phase in phases for pair in phase):
        assert s.count("received", event["eventId"]) == 3, (task, event)
        assert s.count("applied", event["eventId"]) == 1, (task, event)
        assert s.count("discarded", event["eventId"]) == 2, (task, event)


def _assert_in_transaction(pid: int) -> None:
    session = backend(pid)
    assert session is not None, f"backend {pid} is gone"
    assert session["state"] == "idle in transaction", session


def _blocked_behind(holder: int) -> Callable[[], bool]:
    """True once a backend other than *holder* waits for a lock (a claim held by *holder*)."""
    return lambda: any(pid != holder for pid in lock_waiters())


def _finished(s: Scenario, event_id: str, times: int) -> Callable[[], bool]:
    return lambda: s.count("finished", event_id) == times


def _kill_pool_process(s: Scenario, pid: int) -> None:
    """SIGKILL one pool process of a worker of the scenario (checked), and wait until it is gone."""
    assert pid in s.pool_processes(), f"{pid} is not a pool process of this scenario's workers"
    os.kill(pid, signal.SIGKILL)
    s.wait(lambda: gone(pid), 30, f"pool process {pid} to exit")


def test_child_killed_after_commit_before_ack(scenario: NewScenario) -> None:
    """2. SIGKILL after the commit, before the ack: the redelivery is discarded."""
    s = scenario("2", "worker child SIGKILLed after the commit, before the ack")
    events = Events(seed=2)
    s.worker(concurrency=2)
    targets = [(PLACE, events.place()), (DEBIT, events.debit())]
    background = [(PLACE, events.place()) for _ in range(5)] + [
        (DEBIT, events.debit()) for _ in range(5)
    ]
    for _, event in targets:
        s.arm(event["eventId"], "after-commit")
    s.send_all([(t, e, None) for t, e in [*targets, *background]])
    for _, event in targets:
        event_id = event["eventId"]
        paused = s.paused(event_id, "after-commit")
        # Committed: another connection sees the inbox record. Not acknowledged: the broker
        # still holds the message.
        assert ProcessedEvent.objects.filter(event_id=event_id).exists()
        assert s.broker.queue_state(s.queue).unacked >= 1
        _kill_pool_process(s, paused["pid"])
    s.drain()
    s.verify()
    for _, event in targets:
        assert s.count("received", event["eventId"]) == 2
        assert s.count("applied", event["eventId"]) == 1
        assert s.count("discarded", event["eventId"]) == 1


@pytest.mark.parametrize("point", ["handler", "before-commit"])
def test_child_killed_inside_the_transaction(scenario: NewScenario, point: str) -> None:
    """3. SIGKILL inside the transaction: it rolls back, the redelivery applies the event once."""
    s = scenario(
        f"3{'a' if point == 'handler' else 'b'}",
        f"worker child SIGKILLed inside the transaction ({point})",
    )
    events = Events(seed=3)
    s.worker(concurrency=2)
    targets = [(PLACE, events.place()), (DEBIT, events.debit())]
    background = [(PLACE, events.place()) for _ in range(5)] + [
        (DEBIT, events.debit()) for _ in range(5)
    ]
    for _, event in targets:
        s.arm(event["eventId"], point)
    s.send_all([(t, e, None) for t, e in [*targets, *background]])
    for _, event in targets:
        event_id = event["eventId"]
        paused = s.paused(event_id, point)
        _assert_in_transaction(paused["backend_pid"])
        assert not ProcessedEvent.objects.filter(event_id=event_id).exists(), "not committed yet"
        _kill_pool_process(s, paused["pid"])
        # PostgreSQL notices the closed connection and rolls the transaction back.
        s.wait(lambda pid=paused["backend_pid"]: backend(pid) is None, 30, "the backend to end")
    s.drain()
    s.verify()
    for _, event in targets:
        assert s.count("received", event["eventId"]) == 2
        assert s.count("applied", event["eventId"]) == 1
        assert s.count("discarded", event["eventId"]) == 0


def test_whole_worker_killed_in_a_burst(scenario: NewScenario, broker: Broker) -> None:
    """4. The main process SIGKILLed half-way through 1,000 events, then a new worker.

    Two events in the middle of the burst pause, one inside its transaction and one after its
    commit, so the kill is sure to catch work in flight; the pool processes die with the main
    process (Celery asks the kernel for it) and everything they held is delivered again.
    """
    s = scenario("4", "the whole worker SIGKILLed in a burst of 1,000 events, then restarted")
    events = Events(seed=4)
    redis_broker = isinstance(broker, PrivateRedis)
    # Redis gives a dead consumer's messages back after the visibility timeout: short here.
    visibility = 8
    env = {"CELERY_VISIBILITY_TIMEOUT": str(visibility)} if redis_broker else {}
    worker = s.worker(concurrency=2, env=env)
    burst = [(PLACE, events.place(), None) for _ in range(699)]
    burst += [(DEBIT, events.debit(), None) for _ in range(299)]
    random.Random(4).shuffle(burst)
    # Adjacent, so both are running when the burst stops; a debit and an order, so the one
    # paused inside its transaction holds no row the other needs.
    pair = [(DEBIT, events.debit(), None), (PLACE, events.place(), None)]
    burst[400:400] = pair
    inside, committed = (event["eventId"] for _, event, _ in pair)
    s.arm(inside, "before-commit")
    s.arm(committed, "after-commit")
    s.send_all(burst)
    s.paused(inside, "before-commit", timeout=120)
    s.paused(committed, "after-commit", timeout=120)
    children = worker.kill()
    assert children, "the worker had no pool processes"
    assert ProcessedEvent.objects.count() < len(burst), "the kill came after the burst"
    if redis_broker:
        # What the dead worker had taken stays unacknowledged until the visibility timeout.
        assert len(broker.unacked_for(s.queue)) >= 2
        s.wait(
            lambda: min(broker.unacked_ages(s.queue), default=visibility + 1) > visibility,
            visibility + 30,
            "the dead worker's messages to pass the visibility timeout",
        )
    s.worker(concurrency=2, env=env)
    s.drain(timeout=240)
    s.verify()
    assert s.count("received", inside) == 2
    assert s.count("discarded", inside) == 0, "its transaction rolled back with the kill"
    assert s.count("received", committed) == 2
    assert s.count("discarded", committed) == 1, "it had committed before the kill"


def test_two_workers_receive_the_same_event(scenario: NewScenario) -> None:
    """5. Two worker processes run the same event at once: the second blocks on the claim."""
    s = scenario("5", "two workers receive the same event at once")
    events = Events(seed=5)
    first, second = s.worker(concurrency=1), s.worker(concurrency=1)
    for task, event in [(PLACE, events.place()), (DEBIT, events.debit())]:
        event_id = event["eventId"]
        s.arm(event_id, "handler")
        s.send_all([(task, event, None), (task, event, None)])
        paused = s.paused(event_id, "handler")
        s.wait(
            _blocked_behind(paused["backend_pid"]), 30, "the other delivery to wait on the claim"
        )
        runners = {
            pid for kind, _, e, pid, _ in s.journal() if kind == "received" and e == event_id
        }
        assert len(runners) == 2
        assert runners & set(first.children()), "one delivery ran in the first worker"
        assert runners & set(second.children()), "the other in the second worker"
        s.release(event_id, "handler")
        s.wait(_finished(s, event_id, 2), 30, "both deliveries to finish")
        assert s.count("applied", event_id) == 1
        assert s.count("discarded", event_id) == 1
    s.drain()
    s.verify()


@pytest.mark.parametrize("broker", ["redis"], indirect=True)
def test_redelivered_after_the_visibility_timeout(scenario: NewScenario, broker: Broker) -> None:
    """6. A task that outlives Redis's visibility timeout is delivered again while it runs."""
    assert isinstance(broker, PrivateRedis)
    s = scenario("6", "a task outlives the visibility timeout and is redelivered")
    events = Events(seed=6)
    visibility = 4
    s.worker(concurrency=1, visibility_timeout=visibility)
    targets = [(PLACE, events.place()), (DEBIT, events.debit())]
    for task, event in targets:
        event_id = event["eventId"]
        s.arm(event_id, "handler")
        s.send(task, event)
        paused = s.paused(event_id, "handler")
        s.wait(
            lambda: min(broker.unacked_ages(s.queue), default=0) > visibility,
            visibility + 30,
            "the running task to outlive the visibility timeout",
        )
        # Any consumer that starts (or polls) now gives the message back to the queue.
        late = s.worker(concurrency=1, visibility_timeout=visibility)
        s.wait(_blocked_behind(paused["backend_pid"]), 30, "the redelivery to wait on the claim")
        runners = [
            pid for kind, _, e, pid, _ in s.journal() if kind == "received" and e == event_id
        ]
        assert len(runners) == 2
        assert runners[1] in late.children(), "the redelivery ran in the worker started late"
        s.release(event_id, "handler")
        s.wait(_finished(s, event_id, 2), 30, "both deliveries to finish")
        assert s.count("applied", event_id) == 1
        assert s.count("discarded", event_id) == 1
        s.stop_workers()
        s.worker(concurrency=1, visibility_timeout=visibility)
    s.drain()
    s.verify()


def test_broker_restarted_with_tasks_in_flight(scenario: NewScenario, broker: Broker) -> None:
    """7. The broker stops and starts again while one task holds its transaction open and
    another has committed but not acknowledged."""
    s = scenario("7", "the broker restarted with tasks in flight")
    events = Events(seed=7)
    visibility = 10 if isinstance(broker, PrivateRedis) else None
    s.worker(concurrency=2, visibility_timeout=visibility)
    open_txn, committed = events.place(), events.debit()
    s.arm(open_txn["eventId"], "handler")
    s.arm(committed["eventId"], "after-commit")
    background = [(PLACE, events.place(), None) for _ in range(50)]
    background += [(DEBIT, events.debit(), None) for _ in range(50)]
    s.send_all([(PLACE, open_txn, None), (DEBIT, committed, None), *background])
    s.paused(open_txn["eventId"], "handler")
    s.paused(committed["eventId"], "after-commit")
    assert s.broker.queue_state(s.queue).unacked >= 2
    broker.restart()
    s.release(open_txn["eventId"], "handler")
    s.release(committed["eventId"], "after-commit")
    s.drain(timeout=300)
    s.verify()


def test_database_connection_terminated(scenario: NewScenario) -> None:
    """8. ``pg_terminate_backend`` on the worker's connection, inside the transaction and while
    idle between tasks: the transaction rolls back and the delivery tries again.

    ``idempotent_task`` waits a transient database error out in the same delivery (a new
    connection, a capped backoff, then the message back to the broker): without that, the first
    attempt would fail for good and this scenario would find a dead letter.
    """
    s = scenario("8", "the worker's database connection terminated (pg_terminate_backend)")
    events = Events(seed=8)
    s.worker(concurrency=2)
    targets = [(PLACE, events.place(), "handler"), (DEBIT, events.debit(), "before-commit")]
    background = [(PLACE, events.place(), None) for _ in range(5)]
    for _, event, point in targets:
        s.arm(event["eventId"], point)
    s.send_all([(task, event, None) for task, event, _ in targets] + background)
    for _, event, point in targets:
        paused = s.paused(event["eventId"], point)
        pid = paused["backend_pid"]
        _assert_in_transaction(pid)
        assert terminate_backend(pid)
        s.wait(lambda pid=pid: backend(pid) is None, 30, f"backend {pid} to end")
        s.release(event["eventId"], point)
    s.drain()
    for task, event, _ in targets:
        (task_id,) = (t.task_id for t in s.ledger.sent if t.event is event)
        # One delivery: the retry ran in it, on a new connection, spending no Celery retry.
        assert s.count("received", event["eventId"]) == 1
        assert s.logged(f"{task}[{task_id}]: transient database error, attempt 2 again") == 1
        assert s.count("applied", event["eventId"]) == 1
    # The workers' connections, idle between tasks, cut off too: the next tasks reconnect.
    idle = idle_backends()
    assert idle, "the workers keep no connection between tasks"
    for pid in idle:
        terminate_backend(pid)
    s.send_all([(DEBIT, events.debit(), None) for _ in range(6)])
    s.drain()
    s.verify()


def test_published_twice_under_two_task_ids(scenario: NewScenario) -> None:
    """9. A producer that publishes each event again (a retried publish) under a new task id."""
    s = scenario("9", "a producer publishes each event twice under two task ids")
    events = Events(seed=9)
    s.worker(concurrency=2)
    orders = [events.place() for _ in range(10)]
    phases = [
        [(PLACE, e) for e in orders],
        [(PAY, events.pay(e)) for e in orders] + [(DEBIT, events.debit()) for _ in range(10)],
        [(SHIP, events.ship(e)) for e in orders],
    ]
    for phase in phases:
        # The first copies, then the second ones in reverse order: some race, some come later.
        s.send_all([(task, event, None) for task, event in phase])
        s.send_all([(task, event, None) for task, event in reversed(phase)])
        s.wait_applied()
    s.drain()
    s.verify()
    for task, event in (pair for phase in phases for pair in phase):
        task_ids = {t.task_id for t in s.ledger.sent if t.event is event}
        assert len(task_ids) == 2
        assert s.count("applied", event["eventId"]) == 1, (task, event)
        assert s.count("discarded", event["eventId"]) == 1, (task, event)


def _protocol2_headers(task: str, task_id: str) -> dict[str, Any]:
    """The headers of a Celery protocol-2 task message, as a worker expects them."""
    return {
        "lang": "py",
        "task": task,
        "id": task_id,
        "root_id": task_id,
        "parent_id": None,
        "group": None,
        "retries": 0,
        "eta": None,
        "expires": None,
        "timelimit": [None, None],
        "argsrepr": "",
        "kwargsrepr": "",
        "origin": "faults",
    }


def test_poison_messages_dead_lettered_then_redriven(scenario: NewScenario, broker: Broker) -> None:
    """10. Poison messages become dead letters without holding up the events behind them; after
    a fix, a re-drive applies the failed events once.

    Three kinds: a body that is not JSON (the worker's consumer cannot decode it), a PlaceOrder
    without ``eventId`` (no idempotency key), and handlers that fail for two events (an error
    ``idempotent_task`` does not retry). Good events go before, between and after them.
    """
    s = scenario("10", "poison messages dead-lettered, then re-driven after a fix")
    events = Events(seed=10)
    s.worker(concurrency=2)

    def good(n: int) -> list[tuple[str, dict[str, Any], str | None]]:
        return [(PLACE, events.place(), None) for _ in range(n)] + [
            (DEBIT, events.debit(), None) for _ in range(n)
        ]

    keyless = events.place()
    del keyless["eventId"]
    failing = [(PLACE, events.place()), (DEBIT, events.debit())]
    for _, event in failing:
        s.fail(event["eventId"])
    s.send_all(good(3))
    s.send_raw(b'{"not json', _protocol2_headers(PLACE, str(uuid.uuid4())), "application/json")
    s.send_all([*good(3), (PLACE, keyless, None), *good(3)])
    s.send_all([(task, event, None) for task, event in failing])
    s.send_all(good(3))
    # The undecodable message is named by its headers' task, like the keyless one: both
    # (PLACE, "") and neither has an effect.
    s.ledger.expect_dead_letter(PLACE, "")
    s.ledger.expect_extra_dead_letters(PLACE, "", 1)
    for task, event in failing:
        s.ledger.expect_dead_letter(task, event["eventId"])
    # RabbitMQ dead-letters what is rejected; the undecodable message is acknowledged instead.
    s.ledger.broker_dead = 3

    dead = len(s.ledger.expected_dead)
    want = len(s.ledger.expected_effects())
    s.drain(
        until=lambda: (
            ProcessedEvent.objects.count() >= want
            and DeadLetter.objects.count() >= dead
            and s.count("finished") >= len(s.ledger.sent)
        )
    )
    reasons = sorted(DeadLetter.objects.values_list("reason", flat=True))
    assert reasons == ["failed", "failed", "invalid_key", "undecodable"], reasons
    for task, event in failing:
        letter = DeadLetter.objects.get(event_id=event["eventId"])
        assert (letter.task_name, letter.attempts) == (task, 1), "final at once, no retry"
        assert s.count("received", event["eventId"]) == 1
        assert s.count("failed", event["eventId"]) == 1
    broker_dead = s.broker.queue_state(s.queue).dead if isinstance(broker, RabbitMQ) else None
    before = inspect(s.ledger, broker_dead=broker_dead)
    assert not before.problems, "\n".join(before.problems) + s.diagnostics()

    # The fix, then the re-drive, as an operator would run it.
    for _, event in failing:
        s.fix(event["eventId"])
    last = OutboxMessage.objects.order_by("-pk").values_list("pk", flat=True).first() or 0
    result = s.manage("dead_letters", "redrive", "--all")
    assert result.returncode == 0, result.stderr
    # The failed ones and the keyless one (it names a task and carries its arguments).
    assert "re-drove 3 dead letter(s)" in result.stdout, result.stdout
    undecodable = DeadLetter.objects.get(reason="undecodable")
    assert f"dead letter {undecodable.pk} cannot be re-driven" in result.stderr, result.stderr
    assert len(s.record_outbox(after=last)) == 3
    for task, event in failing:
        s.ledger.expect_effect(task, event["eventId"])
    # The keyless event fails again the same way: a new dead letter, and on RabbitMQ a fourth
    # message in the dead-letter queue (the re-driven ones stay there).
    s.ledger.broker_dead = 4
    s.drain(
        until=lambda: (
            ProcessedEvent.objects.count() >= len(s.ledger.expected_effects())
            and DeadLetter.objects.count() >= dead + 1
            and s.count("finished") >= len(s.ledger.sent)
        )
    )
    s.verify()
    assert not OutboxMessage.objects.pending().exists()
    for _, event in failing:
        assert s.count("received", event["eventId"]) == 2
        assert s.count("applied", event["eventId"]) == 1
    assert DeadLetter.objects.get(pk=undecodable.pk).redriven_at is None
    assert DeadLetter.objects.pending().filter(reason="invalid_key").count() == 1


def test_inbox_purged_then_redelivered(scenario: NewScenario) -> None:
    """11. The inbox records deleted, the events delivered again: the order's own key
    (``Order.original_event_id``) still prevents a second order."""
    s = scenario("11", "the inbox record purged, then the event redelivered")
    events = Events(seed=11)
    s.worker(concurrency=2)
    orders = [(PLACE, events.place(), None) for _ in range(5)]
    s.send_all(orders)
    s.drain()
    deleted, _ = ProcessedEvent.objects.filter(consumer=PLACE).delete()
    assert deleted == len(orders)
    s.send_all(orders)
    s.drain()
    s.verify()
    for _, event, _ in orders:
        assert s.count("received", event["eventId"]) == 2
        assert s.count("kept", event["eventId"]) == 1, "the entity key caught the redelivery"


def test_inbox_purged_then_payment_and_debit_redelivered(scenario: NewScenario) -> None:
    """11b. Scenario 11 for the other event-keyed effects: PaymentReceived and DebitAccount.

    Neither is applied twice (the ledger entry's and the payment's unique keys hold), but each
    should end like a first delivery whose effect already exists: processed, no dead letter.
    """
    s = scenario("11b", "the inbox purged, then a payment and a debit redelivered")
    events = Events(seed=111)
    s.worker(concurrency=2)
    order = events.place()
    s.send(PLACE, order)
    s.drain()
    again = [(PAY, events.pay(order), None), (DEBIT, events.debit(), None)]
    s.send_all(again)
    s.drain()
    ProcessedEvent.objects.filter(consumer__in=[PAY, DEBIT]).delete()
    s.send_all(again)
    s.drain(until=lambda: s.count("finished") == len(s.ledger.sent))
    s.verify()


def test_two_consumers_of_the_same_event(scenario: NewScenario) -> None:
    """12. Two consumers of each event, each delivered twice: each applies it exactly once."""
    s = scenario("12", "two consumers of the same event")
    events = Events(seed=12)
    s.worker(concurrency=2)
    orders = [events.place() for _ in range(10)]
    # One delivery, whichever consumer's comes first, dies right after its commit.
    s.arm(orders[0]["eventId"], "after-commit", "kill")
    messages = [(task, e, None) for e in orders for task in (PLACE, consumers.TASK_NAME)]
    s.send_all(messages + messages)
    s.drain()
    s.verify()
    assert s.count("killed") == 1
    for event in orders:
        inbox = ProcessedEvent.objects.for_event(event["eventId"])
        assert sorted(inbox.values_list("consumer", flat=True)) == sorted(
            [PLACE, consumers.CONSUMER]
        )


def _producer_client() -> APIClient:
    producer = UserFactory(username="faults-producer")
    producer.user_permissions.add(Permission.objects.get(codename="submit_event"))
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=producer).key}")
    return client


def test_broker_stopped_while_events_are_posted(scenario: NewScenario, broker: Broker) -> None:
    """13. Events posted over HTTP while the broker is stopped: every POST is accepted, the
    outbox keeps the messages, and the relay publishes them once the broker is back."""
    s = scenario("13", "the broker stopped while events are posted over HTTP (the outbox)")
    events = Events(seed=13)
    s.worker(concurrency=2)
    client = _producer_client()
    orders = [events.place() for _ in range(4)]
    debits = [events.debit() for _ in range(4)]
    broker.stop()
    with producing_to(broker.url):
        # Single events, a batch, and one event posted twice (a client's retry).
        s.send_http(client, [*orders, debits, orders[0]])
    pending = OutboxMessage.objects.pending()
    assert pending.count() == len(s.ledger.sent) == 9
    # The first publish after a commit was tried and failed; the breaker it opened spared the
    # requests after it the attempt (each would have waited on the broker).
    first = pending.order_by("pk").first()
    assert first is not None
    assert first.attempts == 1, "the first publish after commit was tried"
    assert first.last_error, "and its failure kept"
    assert not ProcessedEvent.objects.exists()
    broker.start()
    result = s.manage("relay_outbox")
    assert result.returncode == 0, result.stderr
    assert "published 9 message(s)" in result.stdout, result.stdout
    s.drain(timeout=180)
    assert not OutboxMessage.objects.pending().exists()
    s.verify()
    for event in [*orders, *debits]:
        assert s.count("applied", event["eventId"]) == 1
    assert s.count("received", orders[0]["eventId"]) == 2
    assert s.count("discarded", orders[0]["eventId"]) == 1
