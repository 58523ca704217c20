"""The task wrapper under attack: what user code, Celery's own control flow, the time limits, a
database that comes and goes and hostile events can do to a delivery, in-process (the real
worker tests are in tests/integration/test_worker_delivery.py)."""

from __future__ import annotations

import contextlib
import re
import threading
from datetime import timedelta
from typing import Any
from unittest import mock

import pytest
from celery.exceptions import Reject, Retry, SoftTimeLimitExceeded
from django.db import IntegrityError, OperationalError, connection
from django.test import override_settings
from django.test.utils import CaptureQueriesContext

from idempotency.celery import delivery_number, idempotent_task
from idempotency.celery.task import _TransientWait
from idempotency.decorators import run_once
from idempotency.models import DeadLetter, DeliveryAttempt, ProcessedEvent
from tests.services import in_thread, require_postgres

pytestmark = pytest.mark.django_db

calls: list[Any] = []
failures: list[BaseException] = []


@pytest.fixture(autouse=True)
def _reset() -> Any:
    calls.clear()
    failures.clear()
    yield
    calls.clear()
    failures.clear()


@idempotent_task(name="tests.attack.handler", autoretry_for=(LookupError,), max_retries=2)
def handler(event: Any) -> str:
    calls.append(event)
    if failures:
        raise failures.pop(0)
    return "done"


@idempotent_task(name="tests.attack.retries_itself", bind=True)
def retries_itself(self: Any, event: Any) -> None:
    calls.append(event)
    raise self.retry(exc=LookupError("not yet"), countdown=1)


@idempotent_task(name="tests.attack.rejects")
def rejects(event: Any) -> None:
    calls.append(event)
    raise Reject("the handler refuses this event", requeue=False)


@idempotent_task(name="tests.attack.swallows")
def swallows(event: Any) -> Any:
    """Catches a database error without a savepoint of its own: the transaction is broken."""
    calls.append(event)
    ProcessedEvent.objects.create(consumer="tests.attack.other", event_id="taken")
    with contextlib.suppress(IntegrityError):
        ProcessedEvent.objects.create(consumer="tests.attack.other", event_id="taken")
    return event.get("result")


def transient_error() -> OperationalError:
    return OperationalError("server closed the connection unexpectedly")


def run_in_worker(task: Any, event: Any, **request: Any) -> Any:
    """Run *task* as a worker would (not eagerly): Celery's retry() then publishes for real."""
    task = task._get_current_object()
    task.push_request(
        id="t-worker", args=[event], kwargs={}, is_eager=False, called_directly=False, **request
    )
    try:
        return task.run(event)
    finally:
        task.pop_request()


# --- Celery's control flow raised by user code ---------------------------------------------------


def test_a_retry_the_handler_asks_for_that_cannot_be_published_gives_the_message_back() -> None:
    # Celery turns a retry it cannot publish into Reject(requeue=False): the message would go.
    with (
        mock.patch("celery.canvas.Signature.apply_async", side_effect=ConnectionResetError()),
        pytest.raises(Reject) as rejected,
    ):
        run_in_worker(retries_itself, {"eventId": "e-1"})
    assert rejected.value.requeue is True
    assert calls == [{"eventId": "e-1"}]
    assert not DeadLetter.objects.exists()


def test_a_retry_the_wrapper_cannot_publish_gives_the_message_back() -> None:
    failures.append(LookupError("not yet"))
    with (
        mock.patch("celery.canvas.Signature.apply_async", side_effect=ConnectionResetError()),
        pytest.raises(Reject) as rejected,
    ):
        run_in_worker(handler, {"eventId": "e-1"})
    assert rejected.value.requeue is True


def test_a_published_retry_is_a_retry() -> None:
    with (
        mock.patch("celery.canvas.Signature.apply_async") as publish,
        pytest.raises(Retry),
    ):
        run_in_worker(retries_itself, {"eventId": "e-1"})
    assert publish.called


def test_a_reject_without_requeue_raised_by_the_handler_leaves_a_dead_letter() -> None:
    result = rejects.apply(args=[{"eventId": "e-1"}])
    assert isinstance(result.result, Reject)
    assert result.result.requeue is False
    letter = DeadLetter.objects.get()
    assert (letter.reason, letter.event_id, letter.task_id) == ("failed", "e-1", result.id)
    assert "refuses this event" in letter.exception
    assert not ProcessedEvent.objects.exists()


def test_a_reject_without_requeue_whose_dead_letter_cannot_be_stored_goes_back() -> None:
    with mock.patch("idempotency.deadletters.store._store", side_effect=OperationalError("down")):
        result = rejects.apply(args=[{"eventId": "e-1"}])
    assert isinstance(result.result, Reject)
    assert result.result.requeue is True
    assert not DeadLetter.objects.exists()


# --- Time limits and long outages ----------------------------------------------------------------


@override_settings(IDEMPOTENCY={"TRANSIENT_RETRY_WINDOW": timedelta(seconds=30)})
def test_a_soft_time_limit_during_the_transient_wait_gives_the_message_back() -> None:
    failures.extend([transient_error()] * 3)
    with (
        mock.patch.object(_TransientWait, "pause", side_effect=SoftTimeLimitExceeded()),
        mock.patch("idempotency.deadletters.store._store", side_effect=OperationalError("down")),
    ):
        result = handler.apply(args=[{"eventId": "e-1"}])
    # Escaping to on_failure, it would be rejected without requeue with no dead letter stored.
    assert isinstance(result.result, Reject)
    assert result.result.requeue is True


@override_settings(
    IDEMPOTENCY={"TRANSIENT_RETRY_WINDOW": timedelta(milliseconds=50), "DELIVERY_LIMIT": 3}
)
def test_deliveries_given_back_during_an_outage_do_not_spend_the_delivery_limit() -> None:
    # The database answers the counter but the handler's statements fail (a lock timeout, a
    # serialization failure storm): each delivery is given back after the window.
    event = {"eventId": "e-1"}
    with mock.patch("idempotency.celery.task.delivery_number", return_value=0):
        for _ in range(10):
            failures.extend([transient_error()] * 100)
            result = handler.apply(args=[event], task_id="t-1")
            assert isinstance(result.result, Reject)
            assert result.result.requeue is True, DeadLetter.objects.values_list("reason")
            failures.clear()
        assert handler.apply(args=[event], task_id="t-1").get() == "done"
    assert not DeadLetter.objects.exists()
    assert ProcessedEvent.objects.for_event("e-1").exists()
    assert DeliveryAttempt.objects.get().deliveries <= 3


def test_a_quorum_queue_delivery_count_is_only_a_redelivery_flag() -> None:
    # RabbitMQ counts the deliveries the wrapper gave back itself in x-delivery-count: the
    # durable counter, which the wrapper can take back, decides.
    request = mock.Mock(spec=["delivery_info", "x-delivery-count"])
    request.delivery_info = {}
    setattr(request, "x-delivery-count", 40)
    assert delivery_number(request) == 0


@override_settings(IDEMPOTENCY={"TRANSIENT_RETRY_WINDOW": timedelta(milliseconds=300)})
def test_the_database_down_when_a_redelivery_is_counted() -> None:
    counting = mock.patch(
        "idempotency.models.DeliveryAttemptQuerySet.count_delivery",
        side_effect=[transient_error()] * 2 + [2],
    )
    with mock.patch("idempotency.celery.task.delivery_number", return_value=0), counting as count:
        assert handler.apply(args=[{"eventId": "e-1"}], task_id="t-1").get() == "done"
    assert count.call_count == 3  # waited out, then counted once
    with (
        mock.patch("idempotency.celery.task.delivery_number", return_value=0),
        mock.patch(
            "idempotency.models.DeliveryAttemptQuerySet.count_delivery",
            side_effect=transient_error(),
        ),
    ):
        result = handler.apply(args=[{"eventId": "e-2"}], task_id="t-2")
    assert isinstance(result.result, Reject)
    assert result.result.requeue is True
    assert not DeadLetter.objects.exists()


@override_settings(IDEMPOTENCY={"DELIVERY_LIMIT": 2})
def test_a_duplicate_past_the_delivery_limit_is_acknowledged_without_running() -> None:
    event = {"eventId": "e-1"}
    handler.apply(args=[event])
    DeliveryAttempt.objects.create(task_id="t-1", deliveries=5)
    with mock.patch("idempotency.celery.task.delivery_number", return_value=0):
        result = handler.apply(args=[event], task_id="t-1")
    assert result.state == "SUCCESS"
    assert len(calls) == 1
    assert not DeadLetter.objects.exists()


# --- A transaction left broken by the handler ---------------------------------------------------


@pytest.mark.parametrize("returned", [None, "looked fine"])
def test_a_handler_that_swallows_a_database_error_does_not_succeed(returned: Any) -> None:
    result = swallows.apply(args=[{"eventId": "e-1", "result": returned}])
    # The claim was rolled back with the broken transaction: a success would ack a lost event.
    assert result.state != "SUCCESS"
    assert not ProcessedEvent.objects.filter(consumer=swallows.name).exists()
    letter = DeadLetter.objects.get()
    assert (letter.reason, letter.event_id) == ("failed", "e-1")


# --- Hostile events ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "event",
    [
        ["eventId", "e-1"],
        "e-1",
        10**30,
        None,
        {"eventId": None},
        {"eventId": "e\x00-1"},
    ],
    ids=["list", "str", "huge-int", "none", "none-id", "nul-id"],
)
def test_an_event_without_a_usable_key_is_a_dead_letter(event: Any) -> None:
    result = handler.apply(args=[event])
    assert isinstance(result.result, Reject), result.result
    assert result.result.requeue is False
    assert DeadLetter.objects.get().reason == "invalid_key"
    assert not calls


def test_a_nul_in_the_event_is_applied_or_dead_lettered_never_lost() -> None:
    result = handler.apply(args=[{"eventId": "e-1", "note": "a\x00b", "n": 10**30}])
    if result.state == "SUCCESS":
        assert ProcessedEvent.objects.for_event("e-1").exists()
    else:
        assert isinstance(result.result, Reject)
        assert result.result.requeue is False
        assert DeadLetter.objects.get().event_id == "e-1"


# --- The hot path --------------------------------------------------------------------------------


def test_the_wrapper_adds_no_query_to_a_first_delivery_or_a_duplicate() -> None:
    def bare(event: dict[str, Any]) -> None:
        run_once(handler.name, event, lambda: "done")

    def queries(call: Any, event: dict[str, Any]) -> list[str]:
        with CaptureQueriesContext(connection) as captured:
            call(event)
        # Savepoint names and values differ from one call to the next; the statements must not.
        return [
            re.sub(r"'[^']*'|\b\d+\b", "?", re.sub(r'["`]s\d+_x\d+["`]', '"sp"', q["sql"]))
            for q in captured.captured_queries
        ]

    first = queries(bare, {"eventId": "bare"})
    duplicate = queries(bare, {"eventId": "bare"})
    assert first
    assert duplicate
    assert queries(lambda e: handler.apply(args=[e]), {"eventId": "task"}) == first
    assert queries(lambda e: handler.apply(args=[e]), {"eventId": "task"}) == duplicate


# --- Many copies at once -------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("redelivered", [False, True], ids=["published-64-times", "redelivered"])
def test_64_copies_of_one_message_at_once(redelivered: bool) -> None:
    require_postgres()
    event = {"eventId": "e-64"}
    start = threading.Barrier(64)
    errors: list[BaseException] = []
    outcomes: list[str] = []

    def deliver(n: int) -> None:
        start.wait(30)
        task_id = "t-64" if redelivered else f"t-64-{n}"
        outcomes.append(handler.apply(args=[event], task_id=task_id).state)

    with (
        override_settings(IDEMPOTENCY={"DELIVERY_LIMIT": 100}),
        mock.patch(
            "idempotency.celery.task.delivery_number", return_value=0 if redelivered else None
        ),
    ):
        threads = [in_thread(lambda n=n: deliver(n), errors) for n in range(64)]
        for thread in threads:
            thread.join(120)
    assert not errors
    assert outcomes == ["SUCCESS"] * 64
    assert ProcessedEvent.objects.for_event("e-64").count() == 1
    assert len(calls) == 1
    assert not DeadLetter.objects.exists()
    if redelivered:
        assert DeliveryAttempt.objects.get(task_id="t-64").deliveries == 65
    else:
        assert not DeliveryAttempt.objects.exists()
