"""Failures outside ``deliver()``: a message with no event, and a failure Celery reports around
the task (before it ran, or after it returned). Each ends as a stored dead letter, or the
message goes back to the broker; never rejected without requeue with nothing stored."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from unittest import mock

import pytest
from celery import Signature, signature
from celery.concurrency.solo import TaskPool as SoloPool
from celery.contrib.testing.mocks import TaskMessage
from celery.exceptions import Reject
from celery.worker.request import Request
from django.db import OperationalError
from kombu.exceptions import EncodeError
from kombu.exceptions import OperationalError as KombuOperationalError

from idempotency.celery import idempotent_task
from idempotency.models import DeadLetter, ProcessedEvent

pytestmark = pytest.mark.django_db

calls: list[Any] = []


@idempotent_task(name="tests.outside.apply_event")
def apply_event(event: dict[str, Any]) -> str:
    calls.append(event)
    return str(event["eventId"])


@pytest.fixture(autouse=True)
def _reset() -> Iterator[None]:
    calls.clear()
    yield
    calls.clear()


def database_down() -> Any:
    return mock.patch(
        "idempotency.deadletters.store._store", side_effect=OperationalError("the database is down")
    )


def test_a_message_without_an_event_is_a_dead_letter_as_an_invalid_event() -> None:
    result = apply_event.apply(args=[], kwargs={"note": "no event"})
    assert isinstance(result.result, Reject)
    assert result.result.requeue is False  # stored: the message may leave the broker
    letter = DeadLetter.objects.get()
    assert letter.reason == DeadLetter.Reason.INVALID_EVENT
    assert (letter.task_name, letter.task_id) == (apply_event.name, result.id)
    assert (letter.args, letter.kwargs, letter.event_id) == ([], {"note": "no event"}, "")
    assert "no event" in letter.exception
    assert not calls
    assert not ProcessedEvent.objects.exists()


def test_a_message_without_an_event_goes_back_while_its_dead_letter_cannot_be_stored() -> None:
    with database_down():
        result = apply_event.apply(args=[])
    assert isinstance(result.result, Reject)
    assert result.result.requeue is True  # back to the broker: nothing dropped
    assert not DeadLetter.objects.exists()
    assert not calls


def test_the_event_may_still_be_given_by_keyword() -> None:
    assert apply_event.apply(kwargs={"event": {"eventId": "E-1"}}).get() == "E-1"
    assert calls == [{"eventId": "E-1"}]
    assert ProcessedEvent.objects.for_event("E-1").count() == 1


def test_a_producer_still_cannot_send_a_task_without_its_event() -> None:
    # Celery checks a call against run's signature before it publishes anything.
    with pytest.raises(TypeError, match="event"):
        apply_event.apply_async(args=[])
    with pytest.raises(TypeError, match="event"):
        apply_event.delay()


def result_not_encodable() -> Any:
    """The result backend refusing the result: Celery's EncodeError after the task returned."""
    return mock.patch.object(
        apply_event.backend, "mark_as_done", side_effect=EncodeError("the result cannot be encoded")
    )


def callback_not_sent() -> Any:
    """The task's link (a callback) cannot be published: a broker error after it returned."""
    return mock.patch.object(
        Signature, "apply_async", side_effect=KombuOperationalError("the broker is gone")
    )


def run_in_a_worker(event: dict[str, Any], failure: Any) -> mock.Mock:
    """Run one message as a worker does (not eager: the worker's request, a pool, the tracer),
    with *failure*; the mock records what the request did with the message."""
    broker = mock.Mock()
    callbacks = (
        [dict(signature("tests.outside.callback"))] if failure is callback_not_sent else None
    )
    message = TaskMessage(apply_event.name, args=[event], callbacks=callbacks)
    request = Request(
        message,
        app=apply_event.app,
        task=apply_event,
        on_ack=broker.ack,
        on_reject=broker.reject,
    )
    pool = SoloPool()
    pool.start()
    try:
        with failure():
            request.execute_using_pool(pool)
    finally:
        pool.stop()
    return broker


def requeued(broker: mock.Mock) -> bool | None:
    """True: rejected with requeue; False: rejected without (gone on Redis); None: neither."""
    assert not broker.ack.called
    if not broker.reject.called:
        return None
    (_, _, requeue), _ = broker.reject.call_args
    return bool(requeue)


FAILURES = {"result not encodable": result_not_encodable, "callback not sent": callback_not_sent}


# The tracer warns of an exception raised outside the task's body (the failure, the reject).
@pytest.mark.filterwarnings("ignore:Exception raised outside body:RuntimeWarning")
@pytest.mark.parametrize("failure", FAILURES.values(), ids=FAILURES.keys())
def test_a_failure_outside_the_delivery_goes_back_while_its_dead_letter_cannot_be_stored(
    failure: Any,
) -> None:
    with database_down():
        broker = run_in_a_worker({"eventId": "E-2"}, failure)
    assert requeued(broker) is True  # back to the broker: nothing dropped
    assert not DeadLetter.objects.exists()


@pytest.mark.filterwarnings("ignore:Exception raised outside body:RuntimeWarning")
@pytest.mark.parametrize("failure", FAILURES.values(), ids=FAILURES.keys())
def test_a_failure_outside_the_delivery_is_a_dead_letter(failure: Any) -> None:
    broker = run_in_a_worker({"eventId": "E-2"}, failure)
    assert requeued(broker) is False  # stored: the message may leave the broker
    letter = DeadLetter.objects.get()
    assert (letter.reason, letter.event_id) == (DeadLetter.Reason.FAILED, "E-2")
    assert letter.args == [{"eventId": "E-2"}]


def test_the_hook_stores_nothing_for_its_own_reject() -> None:
    apply_event.on_failure(
        Reject("given back", requeue=True), "T-1", [{"eventId": "E-3"}], {}, None
    )
    assert not DeadLetter.objects.exists()
