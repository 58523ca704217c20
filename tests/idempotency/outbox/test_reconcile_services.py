"""The outbox reconciler against PostgreSQL and the real brokers: a message the broker lost is
published again and applied once; a republish racing the claim's commit is a discarded
duplicate; two reconcilers at once republish each row once."""

from __future__ import annotations

import threading
import time
import uuid
from decimal import Decimal
from typing import Any

import pytest
from django.db import transaction
from django.db.models import F
from django.db.models.functions import Now
from kombu import Connection, Queue

from idempotency import outbox
from idempotency.celery import idempotent_task
from idempotency.models import OutboxMessage, ProcessedEvent
from orders.models import Customer
from tests.celery_app import mocked_celery_app
from tests.idempotency.outbox.test_brokers import destination, producing_to, to, waiting
from tests.services import in_thread, require_postgres, wait_for

__all__ = ["destination"]  # a fixture of the broker tests: one queue of the test's own

pytestmark = pytest.mark.services

#: Held open by a test to keep a claim's transaction uncommitted.
_gates: dict[str, tuple[threading.Event, threading.Event]] = {}


@idempotent_task(name="tests.reconcile.debit_one")
def debit_one(event: dict[str, Any]) -> None:
    """One unit off CUST-1's balance: not idempotent by itself, so a double effect shows."""
    gate = _gates.get(event["eventId"])
    if gate is not None:
        entered, release = gate
        entered.set()
        assert release.wait(30), "the test never released the claim"
    Customer.objects.filter(customer_id="CUST-1").update(balance=F("balance") - 1)


def balance() -> Decimal:
    return Customer.objects.get(customer_id="CUST-1").balance


def backdate(pks: list[int], hours: float) -> None:
    from datetime import timedelta

    delta = timedelta(hours=hours)
    OutboxMessage.objects.filter(pk__in=pks).update(
        published_at=Now() - delta, created_at=Now() - delta
    )


def ready(url: str, name: str) -> int:
    """Messages waiting in queue *name*: on Redis an emptied queue has no key left to declare."""
    from amqp.exceptions import ChannelError

    try:
        return waiting(url, name)
    except ChannelError:
        return 0


def take(url: str, name: str) -> Any:
    """The one message in queue *name*, taken off it (acknowledged)."""
    with Connection(url) as conn:
        message = Queue(name)(conn.default_channel).get(no_ack=True)
    assert message is not None, f"nothing in {name}"
    return message


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("destination", ["rabbitmq", "redis"], indirect=True)
def test_a_message_the_broker_lost_is_published_again_and_applied_once(
    destination: tuple[str, str], catalogue: Any
) -> None:
    require_postgres()
    url, name = destination
    before = balance()
    event = {"eventId": str(uuid.uuid4())}
    with producing_to(url):
        with transaction.atomic():
            message = outbox.enqueue(
                debit_one, [event], event_id=event["eventId"], options=to(name)
            )
        wait_for(lambda: waiting(url, name) == 1, 10, "the publish after commit")
        take(url, name)  # the broker loses it: gone, never delivered
        assert ready(url, name) == 0
        backdate([message.pk], hours=2)
        result = outbox.reconcile()
        assert (result.checked, result.republished) == (1, 1), result
        # The same task id and event, back in the queue: a worker applies it.
        copy = take(url, name)
        assert copy.headers["id"] == str(message.task_id)
        args, kwargs, _ = copy.decode()
        debit_one.apply(args=args, kwargs=kwargs, task_id=copy.headers["id"]).get()
        assert balance() == before - 1
        # The next check sees the inbox record and closes the row.
        backdate([message.pk], hours=3)
        result = outbox.reconcile()
        assert (result.confirmed, result.republished) == (1, 0), result
        assert ready(url, name) == 0
    message.refresh_from_db()
    assert message.reconciled_at is not None
    assert message.republished == 1


@pytest.mark.django_db(transaction=True)
def test_a_republish_while_the_claim_commits_is_a_discarded_duplicate(catalogue: Any) -> None:
    """The reconciler checks while a worker holds the event's claim uncommitted: it sees no
    record and republishes; the worker commits; the copy is discarded by the inbox."""
    require_postgres()
    before = balance()
    event = {"eventId": str(uuid.uuid4())}
    message = outbox.enqueue(debit_one, [event], event_id=event["eventId"], publish_on_commit=False)
    OutboxMessage.objects.filter(pk=message.pk).update(published_at=Now())
    backdate([message.pk], hours=2)
    entered, release = threading.Event(), threading.Event()
    _gates[event["eventId"]] = (entered, release)
    errors: list[BaseException] = []
    worker = in_thread(
        lambda: debit_one.apply(args=[event], task_id=str(message.task_id)).get(), errors
    )
    try:
        assert entered.wait(30), errors
        with mocked_celery_app() as app:
            result = outbox.reconcile()
        assert result.republished == 1, result
        copy = app.send_task.call_args
    finally:
        release.set()
        worker.join(30)
        _gates.pop(event["eventId"], None)
    assert not errors, errors
    assert ProcessedEvent.objects.filter(event_id=event["eventId"]).count() == 1
    # The republished copy reaches a worker after the commit: a duplicate, skipped.
    debit_one.apply(args=copy.kwargs["args"], task_id=copy.kwargs["task_id"]).get()
    assert balance() == before - 1


@pytest.mark.django_db(transaction=True)
def test_two_reconcilers_at_once_republish_each_row_once(catalogue: Any) -> None:
    require_postgres()
    pks = []
    for n in range(40):
        row = outbox.enqueue(
            debit_one, [{"eventId": f"race-{n}"}], event_id=f"race-{n}", publish_on_commit=False
        )
        pks.append(row.pk)
    OutboxMessage.objects.filter(pk__in=pks).update(published_at=Now())
    backdate(pks, hours=2)
    start = threading.Barrier(2)
    errors: list[BaseException] = []
    results: list[Any] = []
    with mocked_celery_app() as app:
        app.send_task.side_effect = lambda *a, **k: time.sleep(0.005)

        def run() -> None:
            start.wait(10)
            results.append(outbox.reconcile(batch_size=5))

        threads = [in_thread(run, errors) for _ in range(2)]
        for thread in threads:
            thread.join(60)
        ids = [call.kwargs["task_id"] for call in app.send_task.call_args_list]
    assert not errors, errors
    assert len(ids) == len(set(ids)) == 40
    assert sum(r.republished for r in results) == 40
    assert set(OutboxMessage.objects.values_list("republished", flat=True)) == {1}


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("destination", ["rabbitmq", "redis"], indirect=True)
def test_a_broker_that_never_answers_does_not_hold_the_rows_locked(
    destination: tuple[str, str],
) -> None:
    """A batch's rows are locked until its republishes return: against a listener that accepts
    and never answers, a Redis publish without a socket timeout never returned (a reconciling
    relay stalled with them). Each step is bounded by PUBLISH_TIMEOUT now."""
    from tests.idempotency.outbox.test_brokers import broker_url, silent_listener

    require_postgres()
    url, name = destination
    kind = "rabbitmq" if url.startswith("amqp") else "redis"
    pks = [
        outbox.enqueue(
            debit_one,
            [{"eventId": str(uuid.uuid4())}],
            event_id="x",
            options=to(name),
            publish_on_commit=False,
        ).pk
        for _ in range(3)
    ]
    backdate(pks, hours=2)
    results: list[Any] = []
    errors: list[BaseException] = []
    with silent_listener() as silent, producing_to(broker_url(kind, silent)):
        start = time.monotonic()
        thread = in_thread(lambda: results.append(outbox.reconcile()), errors)
        thread.join(30)
        took = time.monotonic() - start
    assert not thread.is_alive(), "the reconcile still held its batch locked after 30 s"
    assert not errors, errors
    assert took < 15, f"the reconcile held its batch for {took:.1f}s"
    assert results[0].outage is not None
    rows = OutboxMessage.objects.filter(pk__in=pks)
    assert sorted(rows.values_list("republished", flat=True)) == [0, 0, 0]
    with producing_to(url):
        assert outbox.reconcile().republished == 3
    assert waiting(url, name) == 3
