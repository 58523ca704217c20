"""The Celery decorator, run in-process with ``apply()`` (the broker tests are in integration/)."""

from __future__ import annotations

from typing import Any

import pytest
from celery.exceptions import Reject

from idempotency.celery import idempotent_task
from idempotency.exceptions import PayloadMismatch
from idempotency.models import ProcessedEvent

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
