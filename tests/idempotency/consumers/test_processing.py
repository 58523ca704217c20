"""EventConsumer, the core of every plain consumer: what becomes of each message."""

from __future__ import annotations

import threading
import uuid
from typing import Any
from unittest import mock

import pytest
from django.db import OperationalError, connection, transaction
from django.test import override_settings

from idempotency import deadletters
from idempotency.consumers import Decision, Delivery, EventConsumer
from idempotency.exceptions import IdempotencyConfigurationError
from idempotency.models import DeadLetter, DeliveryAttempt, ProcessedEvent
from orders.models import Customer
from tests.idempotency.consumers import handlers
from tests.services import in_thread, require_postgres

pytestmark = pytest.mark.django_db

CONSUMER = "tests.consumers.credit"


@pytest.fixture(autouse=True)
def customer(db: None) -> Customer:
    return handlers.ensure_customer()


class Killed(BaseException):
    """Stands for a consumer killed while it processes a message: nothing is decided."""


def consumer(handler: Any = handlers.credit, **options: Any) -> EventConsumer:
    return EventConsumer(handler, consumer=CONSUMER, **options)


def event(**extra: Any) -> dict[str, Any]:
    return {"eventId": str(uuid.uuid4()), **extra}


def balance() -> str:
    return str(Customer.objects.get(customer_id=handlers.CUSTOMER_ID).balance)


def test_a_first_delivery_is_applied_and_acknowledged() -> None:
    body = event()
    outcome = consumer().process(Delivery(body, message_id="m-1"))
    assert (outcome.decision, outcome.status) == (Decision.ACK, "processed")
    assert outcome.result == {"credited": body["eventId"]}
    assert handlers.effects(body["eventId"]) == 1
    assert ProcessedEvent.objects.for_consumer(CONSUMER).for_event(body["eventId"]).exists()


def test_a_redelivery_is_a_duplicate_acknowledged_with_the_stored_result() -> None:
    body = event()
    events = consumer()
    events.process(Delivery(body, message_id="m-1"))
    again = events.process(Delivery(body, message_id="m-1", redelivered=True))
    assert (again.decision, again.status) == (Decision.ACK, "duplicate")
    assert again.result == {"credited": body["eventId"]}
    assert handlers.effects(body["eventId"]) == 1
    assert balance() == "1.00"


def test_a_second_consumer_of_the_same_event_applies_it_for_itself() -> None:
    body = event()
    consumer().process(Delivery(body))
    other = EventConsumer(handlers.credit, consumer="tests.consumers.other").process(Delivery(body))
    assert other.status == "processed"
    assert handlers.effects(body["eventId"]) == 2


@pytest.mark.parametrize(
    "body",
    [
        {"no": "key"},
        {"eventId": None},
        {"eventId": ""},
        {"eventId": "a\x00b"},
        {"eventId": True},
        {"eventId": 10**300},
        {"eventId": ["a", "list"]},
        "not a mapping",
        ["not", "a", "mapping"],
        None,
    ],
    ids=repr,
)
def test_an_event_with_no_usable_key_is_dead_lettered_then_acknowledged(body: Any) -> None:
    outcome = consumer().process(Delivery(body, message_id="m-bad", raw="{...}"))
    assert (outcome.decision, outcome.status) == (Decision.ACK, "dead-lettered")
    letter = DeadLetter.objects.get()
    assert letter.reason == deadletters.INVALID_KEY
    assert letter.task_name == CONSUMER
    assert letter.task_id == "m-bad"
    assert letter.body == "{...}"
    # A consumer's letter is no Celery task: a re-drive must not send it as one.
    assert not letter.can_redrive
    assert not ProcessedEvent.objects.exists()


def test_a_number_of_thirty_digits_is_a_usable_key() -> None:
    outcome = consumer().process(Delivery({"eventId": 10**30}))
    assert outcome.status == "processed"
    assert outcome.event_id == str(10**30)


def test_an_event_too_large_is_dead_lettered_as_invalid() -> None:
    with override_settings(IDEMPOTENCY={"MAX_EVENT_BYTES": 100}):
        outcome = consumer().process(Delivery(event(blob="x" * 200)))
    assert outcome.status == "dead-lettered"
    assert DeadLetter.objects.get().reason == deadletters.INVALID_EVENT
    assert not ProcessedEvent.objects.exists()


def test_a_handler_failure_rolls_the_effect_back_and_is_dead_lettered() -> None:
    body = event()
    outcome = consumer(handlers.poison).process(Delivery(body, message_id="m-2"))
    assert (outcome.decision, outcome.status) == (Decision.ACK, "dead-lettered")
    letter = DeadLetter.objects.get()
    assert letter.reason == deadletters.FAILED
    assert letter.event_id == body["eventId"]
    assert "Poison" in letter.exception
    assert "Traceback" in letter.traceback
    # No raw body from the adapter: the event itself is kept, as JSON.
    assert body["eventId"] in letter.body
    assert handlers.effects(body["eventId"]) == 0
    assert balance() == "0.00"
    assert not ProcessedEvent.objects.exists()


def test_a_failure_whose_dead_letter_cannot_be_stored_goes_back_to_the_broker() -> None:
    with mock.patch("idempotency.deadletters.store._store", side_effect=OperationalError("down")):
        outcome = consumer(handlers.poison).process(Delivery(event()))
    assert (outcome.decision, outcome.status) == (Decision.REQUEUE, "not-stored")
    assert not DeadLetter.objects.exists()


def test_an_error_in_retry_for_goes_back_for_a_redelivery() -> None:
    outcome = consumer(handlers.poison, retry_for=(handlers.Poison,)).process(Delivery(event()))
    assert (outcome.decision, outcome.status) == (Decision.REQUEUE, "retry")
    assert not DeadLetter.objects.exists()


def test_a_transient_error_is_waited_out_in_process() -> None:
    calls = []

    def flaky(body: dict[str, Any]) -> Any:
        calls.append(body)
        if len(calls) < 3:
            raise OperationalError("server closed the connection unexpectedly")
        return handlers.credit(body)

    body = event()
    with mock.patch("idempotency.transient.time.sleep") as sleep:
        outcome = consumer(flaky, transient_window=60).process(Delivery(body))
    assert outcome.status == "processed"
    assert len(calls) == 3
    assert sleep.call_count == 2
    assert handlers.effects(body["eventId"]) == 1
    assert not DeadLetter.objects.exists()


def test_an_outage_longer_than_the_window_never_drops_the_message() -> None:
    def down(body: Any) -> Any:
        raise OperationalError("could not connect to server")

    outcome = consumer(down, transient_window=0).process(Delivery(event()))
    assert (outcome.decision, outcome.status) == (Decision.REQUEUE, "transient")
    assert not DeadLetter.objects.exists()
    assert not ProcessedEvent.objects.exists()


def test_an_interrupt_decides_nothing() -> None:
    def interrupted(body: Any) -> Any:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        consumer(interrupted).process(Delivery(event()))
    assert not DeadLetter.objects.exists()
    assert not ProcessedEvent.objects.exists()


def test_a_reused_event_id_with_another_payload_is_dead_lettered() -> None:
    body = event(amount=1)
    events = consumer()
    events.process(Delivery(body))
    outcome = events.process(Delivery({**body, "amount": 2}))
    assert outcome.status == "dead-lettered"
    assert DeadLetter.objects.get().reason == deadletters.FAILED
    assert handlers.effects(body["eventId"]) == 1


def test_an_undecodable_body_is_dead_lettered_with_its_raw_text() -> None:
    outcome = consumer().undecodable(
        Delivery(None, message_id="m-3", raw="\x00garbage"), ValueError("not JSON")
    )
    assert outcome.status == "dead-lettered"
    letter = DeadLetter.objects.get()
    assert letter.reason == deadletters.UNDECODABLE
    assert letter.body == "\\x00garbage"


@override_settings(IDEMPOTENCY={"DELIVERY_LIMIT": 3})
def test_a_message_redelivered_past_the_limit_is_dead_lettered() -> None:
    body = event()
    events = consumer()
    delivery = Delivery(body, message_id="m-4", redelivered=True)
    with mock.patch.object(events, "_apply", side_effect=Killed):
        # Deliveries 2 and 3 run, and the consumer dies in each (as a SIGKILL would).
        for _ in range(2):
            with pytest.raises(Killed):
                events.process(delivery)
        outcome = events.process(delivery)
    assert outcome.status == "dead-lettered"
    letter = DeadLetter.objects.get()
    assert (letter.reason, letter.attempts) == (deadletters.DELIVERY_LIMIT, 4)
    assert DeliveryAttempt.objects.get().task_id == f"{CONSUMER}:m-4"


@override_settings(IDEMPOTENCY={"DELIVERY_LIMIT": 1})
def test_a_processed_message_redelivered_past_the_limit_is_acknowledged() -> None:
    body = event()
    events = consumer()
    events.process(Delivery(body, message_id="m-5"))
    outcome = events.process(Delivery(body, message_id="m-5", redelivered=True))
    assert (outcome.decision, outcome.status) == (Decision.ACK, "duplicate")
    assert not DeadLetter.objects.exists()


def test_a_first_delivery_writes_no_delivery_counter() -> None:
    consumer().process(Delivery(event(), message_id="m-6"))
    assert not DeliveryAttempt.objects.exists()


@override_settings(IDEMPOTENCY={"DELIVERY_LIMIT": 2})
def test_an_outage_given_back_does_not_spend_the_delivery_limit() -> None:
    def down(body: Any) -> Any:
        raise OperationalError("could not connect to server")

    delivery = Delivery(event(), message_id="m-7", redelivered=True)
    for _ in range(5):
        assert consumer(down, transient_window=0).process(delivery).status == "transient"
    assert consumer().process(delivery).status == "processed"


@pytest.mark.django_db(transaction=True)
def test_an_on_commit_callback_that_raises_after_the_commit_is_acknowledged() -> None:
    handlers.ensure_customer()

    def then_raise(body: dict[str, Any]) -> Any:
        transaction.on_commit(lambda: 1 / 0)
        return handlers.credit(body)

    body = event()
    outcome = consumer(then_raise).process(Delivery(body))
    assert (outcome.decision, outcome.status) == (Decision.ACK, "applied-callback-failed")
    assert handlers.effects(body["eventId"]) == 1
    assert not DeadLetter.objects.exists()


@pytest.mark.parametrize(
    "options",
    [
        {"handler": 42},
        {"consumer": ""},
        {"consumer": "   "},
        {"consumer": None},
        {"consumer": "x" * 201},
        {"transient_window": -1},
        {"transient_window": float("nan")},
        {"transient_window": 10**30},
    ],
    ids=repr,
)
def test_a_misconfigured_consumer_is_refused(options: dict[str, Any]) -> None:
    arguments = {"handler": handlers.credit, "consumer": CONSUMER, **options}
    with pytest.raises(IdempotencyConfigurationError):
        EventConsumer(arguments.pop("handler"), **arguments)


@pytest.mark.services
@pytest.mark.django_db(transaction=True)
def test_sixty_four_consumers_given_the_same_message_apply_it_once() -> None:
    require_postgres()
    handlers.ensure_customer()
    body = event()
    events = consumer()
    outcomes: list[str] = []
    errors: list[BaseException] = []
    start = threading.Barrier(64)

    def one() -> None:
        start.wait()
        outcomes.append(events.process(Delivery(body, message_id="m-64")).status)

    threads = [in_thread(one, errors) for _ in range(64)]
    for thread in threads:
        thread.join(120)
    assert not errors
    assert sorted(set(outcomes)) == ["duplicate", "processed"]
    assert outcomes.count("processed") == 1
    assert len(outcomes) == 64
    assert handlers.effects(body["eventId"]) == 1
    assert balance() == "1.00"
    connection.close()
