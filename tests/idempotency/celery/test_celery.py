"""The Celery decorator, run in-process with ``apply()`` (the broker tests are in integration/)."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any
from unittest import mock

import pytest
from celery.app.task import Context
from celery.exceptions import Reject, SoftTimeLimitExceeded
from django.db import IntegrityError, OperationalError, connection
from django.test import override_settings
from django.test.utils import CaptureQueriesContext

from idempotency.celery import delivery_number, idempotent_task
from idempotency.exceptions import AfterCommitError, InvalidEvent, PayloadMismatch
from idempotency.models import DeadLetter, DeliveryAttempt, ProcessedEvent

pytestmark = pytest.mark.django_db

calls: list[Any] = []


@idempotent_task
def record_call(event: dict[str, Any]) -> dict[str, Any]:
    calls.append(event)
    return {"seen": len(calls)}


@idempotent_task(consumer="tests.explicit", key=("orderId", "paymentId"), on_mismatch="discard")
def pay(event: dict[str, Any]) -> None:
    calls.append(event)


@idempotent_task(bind=True, acks_late=False)
def bound(self: Any, event: dict[str, Any]) -> str:
    return str(self.name)


@pytest.fixture(autouse=True)
def _reset() -> None:
    calls.clear()


def test_safe_task_options() -> None:
    assert record_call.acks_late is True
    assert record_call.reject_on_worker_lost is True
    assert record_call.idempotent is True
    assert hasattr(record_call, "delay_on_commit")


def test_options_can_be_overridden_and_self_is_passed_when_bound() -> None:
    assert bound.acks_late is False
    assert bound.apply(args=[{"eventId": "e-1"}]).get() == bound.name


def test_runs_once_and_replays_the_result() -> None:
    event = {"eventId": "e-1"}
    assert record_call.apply(args=[event]).get() == {"seen": 1}
    assert record_call.apply(args=[event]).get() == {"seen": 1}
    assert len(calls) == 1
    record = ProcessedEvent.objects.get()
    assert record.consumer == record_call.name  # the task name by default
    assert record.result == {"seen": 1}


def test_explicit_consumer_and_composite_key() -> None:
    pay.apply(args=[{"eventId": "e-1", "orderId": "ORD-1", "paymentId": "PAY-1"}])
    # The producer re-sent the same payment under a new event id: the business key catches it.
    pay.apply(args=[{"eventId": "e-2", "orderId": "ORD-1", "paymentId": "PAY-1"}])
    assert len(calls) == 1
    record = ProcessedEvent.objects.get()
    assert (record.consumer, record.event_id) == ("tests.explicit", "ORD-1|PAY-1")
    assert record.has_mismatch  # the payloads differ in eventId; discarded, but visible


def test_a_keyless_message_is_rejected_without_requeue() -> None:
    result = record_call.apply(args=[{"orderId": "ORD-1"}])
    assert isinstance(result.result, Reject)
    assert result.result.requeue is False
    assert not calls
    assert not ProcessedEvent.objects.exists()


def test_a_mismatch_fails_the_task_by_default() -> None:
    record_call.apply(args=[{"eventId": "e-1", "amount": 1}])
    result = record_call.apply(args=[{"eventId": "e-1", "amount": 2}])
    assert isinstance(result.result, PayloadMismatch)
    assert len(calls) == 1
    assert ProcessedEvent.objects.get().has_mismatch


def test_two_consumers_of_one_event_each_apply_it() -> None:
    event = {"eventId": "e-1", "orderId": "ORD-1", "paymentId": "PAY-1"}
    record_call.apply(args=[event])
    pay.apply(args=[event])
    assert len(calls) == 2
    assert ProcessedEvent.objects.for_event("e-1").count() == 1
    assert ProcessedEvent.objects.count() == 2


# --- What becomes of a delivery ------------------------------------------------------------------

failures: list[BaseException] = []


@idempotent_task(max_retries=2, autoretry_for=(LookupError,), retry_backoff=False)
def fragile(event: dict[str, Any]) -> str:
    """Raises the queued failures one per call, then succeeds."""
    calls.append(event)
    if failures:
        raise failures.pop(0)
    return "done"


@idempotent_task(bind=True)
def report_retries(self: Any, event: dict[str, Any]) -> int:
    if failures:
        raise failures.pop(0)
    return int(self.request.retries)


@pytest.fixture(autouse=True)
def _reset_failures() -> Any:
    failures.clear()
    yield
    failures.clear()


def transient_error() -> OperationalError:
    return OperationalError("server closed the connection unexpectedly")


SHORT_WAIT = {"TRANSIENT_RETRY_WINDOW": timedelta(seconds=2)}


@override_settings(IDEMPOTENCY=SHORT_WAIT)
def test_a_transient_error_is_waited_out_without_spending_a_retry() -> None:
    failures.extend([transient_error(), transient_error()])
    result = report_retries.apply(args=[{"eventId": "e-1"}])
    assert result.state == "SUCCESS"
    assert result.get() == 0  # still the first attempt as Celery counts them
    assert ProcessedEvent.objects.for_event("e-1").exists()
    assert not DeadLetter.objects.exists()


@override_settings(IDEMPOTENCY={"TRANSIENT_RETRY_WINDOW": timedelta(milliseconds=300)})
def test_a_transient_error_past_the_window_gives_the_message_back() -> None:
    failures.extend([transient_error()] * 50)
    started = time.monotonic()
    with mock.patch.object(fragile, "retry") as retry:
        result = fragile.apply(args=[{"eventId": "e-1"}])
    assert time.monotonic() - started < 5
    assert isinstance(result.result, Reject)
    assert result.result.requeue is True  # back to the broker: nothing dropped
    assert not retry.called  # no retry spent
    assert len(calls) >= 2  # it was tried again in-process first
    assert not DeadLetter.objects.exists()
    assert not ProcessedEvent.objects.exists()


def test_a_non_transient_database_error_fails_for_good() -> None:
    failures.append(IntegrityError("duplicate key value violates unique constraint"))
    result = fragile.apply(args=[{"eventId": "e-1"}])
    assert isinstance(result.result, IntegrityError)
    assert len(calls) == 1
    letter = DeadLetter.objects.get()
    assert (letter.reason, letter.event_id, letter.task_id) == ("failed", "e-1", result.id)


def test_the_transient_wait_stays_inside_the_time_limit() -> None:
    with override_settings(IDEMPOTENCY={"TRANSIENT_RETRY_WINDOW": timedelta(seconds=30)}):
        task = fragile._get_current_object()
        with mock.patch.object(type(task), "soft_time_limit", 8):
            assert task._transient_window() == 4
        assert task._transient_window() == 30


def test_a_final_failure_whose_dead_letter_cannot_be_stored_goes_back_to_the_broker() -> None:
    failures.append(ValueError("a bug"))
    with mock.patch("idempotency.deadletters.store._store", side_effect=OperationalError("down")):
        result = fragile.apply(args=[{"eventId": "e-1"}])
    assert isinstance(result.result, Reject)
    assert result.result.requeue is True
    assert isinstance(result.result.reason, ValueError)
    assert not DeadLetter.objects.exists()


def test_a_keyless_message_whose_dead_letter_cannot_be_stored_goes_back() -> None:
    with mock.patch("idempotency.deadletters.store._store", side_effect=OperationalError("down")):
        result = fragile.apply(args=[{"orderId": "ORD-1"}])
    assert isinstance(result.result, Reject)
    assert result.result.requeue is True
    assert not calls


def test_an_invalid_event_becomes_a_dead_letter_and_is_not_requeued() -> None:
    with mock.patch(
        "idempotency.celery.decorator.run_once",
        side_effect=InvalidEvent("nested deeper than 64 levels"),
    ):
        result = fragile.apply(args=[{"eventId": "e-9", "deep": []}])
    assert isinstance(result.result, Reject)
    assert result.result.requeue is False
    letter = DeadLetter.objects.get()
    assert (letter.reason, letter.event_id) == (DeadLetter.Reason.INVALID_EVENT, "e-9")
    assert "64 levels" in letter.exception


def test_retries_are_spent_on_autoretry_errors_then_the_failure_is_final() -> None:
    failures.extend([LookupError("not yet")] * 3)
    result = fragile.apply(args=[{"eventId": "e-1"}])
    assert isinstance(result.result, LookupError)
    assert len(calls) == 3  # the first attempt and max_retries=2 retries
    letter = DeadLetter.objects.get()
    assert letter.attempts == 3
    assert fragile.retry_for == (LookupError,)
    assert not getattr(fragile, "autoretry_for", ())  # Celery's own wrapper is not involved


def test_a_retry_that_cannot_be_published_gives_the_message_back() -> None:
    # Celery rejects without requeue when the broker refuses the retry's message.
    failures.append(LookupError("not yet"))
    unpublished = Reject(ConnectionResetError("broker gone"), requeue=False)
    with mock.patch("celery.app.task.Task.retry", side_effect=unpublished):
        result = fragile.apply(args=[{"eventId": "e-1"}])
    assert isinstance(result.result, Reject)
    assert result.result.requeue is True
    assert not DeadLetter.objects.exists()


def test_an_error_after_the_commit_is_a_success() -> None:
    def applied_then_hook_failed(*args: Any, **kwargs: Any) -> None:
        raise AfterCommitError(fragile.name, "e-1") from RuntimeError("hook")

    with mock.patch("idempotency.celery.decorator.run_once", side_effect=applied_then_hook_failed):
        result = fragile.apply(args=[{"eventId": "e-1"}])
    assert result.state == "SUCCESS"
    assert not DeadLetter.objects.exists()


# --- Counting deliveries -------------------------------------------------------------------------


def request_with(**fields: Any) -> Context:
    return Context({"id": "t-1", "delivery_info": {}, **fields})


def test_delivery_number() -> None:
    assert delivery_number(request_with()) is None  # a first delivery
    assert delivery_number(request_with(delivery_info={"redelivered": True})) == 0
    assert delivery_number(request_with(redelivered=True)) == 0  # kombu's Redis header
    # Quorum queues count the deliveries given back during an outage too: counted durably.
    assert delivery_number(request_with(**{"x-delivery-count": 3})) == 0
    # A quorum queue's first delivery on RabbitMQ 3.10 carries the header, at 0.
    assert delivery_number(request_with(**{"x-delivery-count": 0})) is None
    assert delivery_number(Context({})) is None  # an eager call


def test_a_first_delivery_writes_no_delivery_counter() -> None:
    with CaptureQueriesContext(connection) as queries:
        fragile.apply(args=[{"eventId": "e-1"}])
        fragile.apply(args=[{"eventId": "e-1"}])  # a duplicate
    assert not any("deliveryattempt" in q["sql"].lower() for q in queries.captured_queries)
    assert not DeliveryAttempt.objects.exists()


def test_redeliveries_are_counted_durably() -> None:
    assert DeliveryAttempt.objects.count_delivery("t-1", task_name="x", event_id="e") == 2
    assert DeliveryAttempt.objects.count_delivery("t-1") == 3
    row = DeliveryAttempt.objects.get()
    assert (row.task_id, row.task_name, row.event_id, row.deliveries) == ("t-1", "x", "e", 3)


@override_settings(IDEMPOTENCY={"DELIVERY_LIMIT": 3})
def test_a_message_past_the_delivery_limit_becomes_a_dead_letter() -> None:
    event = {"eventId": "e-1"}
    with mock.patch("idempotency.celery.task.delivery_number", return_value=0):
        DeliveryAttempt.objects.create(task_id="t-1", deliveries=2)
        failures.append(SoftTimeLimitExceeded())  # the third delivery runs (and fails)
        third = fragile.apply(args=[event], task_id="t-1")
        assert isinstance(third.result, SoftTimeLimitExceeded)
        assert DeadLetter.objects.get().reason == DeadLetter.Reason.FAILED
        DeadLetter.objects.all().delete()
        fourth = fragile.apply(args=[event], task_id="t-1")
    assert isinstance(fourth.result, Reject)
    assert fourth.result.requeue is False
    assert len(calls) == 1  # the fourth delivery did not run the handler
    letter = DeadLetter.objects.get()
    assert (letter.reason, letter.task_id, letter.event_id) == ("delivery_limit", "t-1", "e-1")
    assert letter.attempts == 4
    assert letter.can_redrive
    assert DeliveryAttempt.objects.get().deliveries == 4


def test_a_message_past_the_delivery_limit_whose_event_is_processed_is_acknowledged() -> None:
    event = {"eventId": "e-1"}
    fragile.apply(args=[event])
    DeliveryAttempt.objects.create(task_id="t-1", deliveries=10)
    with mock.patch("idempotency.celery.task.delivery_number", return_value=0):
        result = fragile.apply(args=[event], task_id="t-1")
    assert result.state == "SUCCESS"
    assert len(calls) == 1
    assert not DeadLetter.objects.exists()
    assert DeliveryAttempt.objects.get().deliveries == 11


@override_settings(IDEMPOTENCY={"DELIVERY_LIMIT": None})
def test_no_delivery_limit() -> None:
    with mock.patch("idempotency.celery.task.delivery_number", return_value=1000):
        assert fragile.apply(args=[{"eventId": "e-1"}]).get() == "done"
    assert not DeliveryAttempt.objects.exists()


def test_the_retry_horizon_check_sees_the_autoretry_backoff() -> None:
    from celery import current_app

    from idempotency.checks import retry_horizon

    @idempotent_task(
        name="tests.horizon",
        autoretry_for=(LookupError,),
        retry_backoff_max=10,
        default_retry_delay=1,
    )
    def horizon(event: dict[str, Any]) -> None:
        pass

    # 5 retries backing off 1, 2, 4, 8, then the 10 s cap (W001 compares it with retentions).
    assert retry_horizon(current_app, horizon).delay == timedelta(seconds=25)


def test_result_serializer_is_passed_to_the_claim() -> None:
    @idempotent_task(name="tests.serialized", result_serializer=lambda value: {"kept": value})
    def serialized(event: dict[str, Any]) -> str:
        return "value"

    serialized.apply(args=[{"eventId": "e-1"}])
    assert ProcessedEvent.objects.get().result == {"kept": "value"}
