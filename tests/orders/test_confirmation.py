"""A consumer that publishes: PlaceOrder emits OrderPlaced through the outbox, and its consumer
emails the customer over real SMTP (an aiosmtpd server on a loopback port)."""

from __future__ import annotations

import email
import socket
import uuid
from collections.abc import Iterator
from email.message import Message
from typing import Any

import pytest
from django.test import override_settings

from idempotency.consumers import derived_event_id
from idempotency.inbox import idempotent
from idempotency.models import OutboxMessage, ProcessedEvent
from orders import services
from orders.models import ConfirmationEmail, Customer, Order
from orders.tasks import place_order, send_order_confirmation
from tests.factories import place_order_event
from tests.orders.helpers import deliver

aiosmtpd_controller = pytest.importorskip("aiosmtpd.controller")

pytestmark = pytest.mark.django_db


class Inbox:
    """What the SMTP server accepted."""

    def __init__(self) -> None:
        self.messages: list[Message] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        self.messages.append(email.message_from_bytes(envelope.content))
        return "250 OK"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def smtp() -> Iterator[Inbox]:
    inbox = Inbox()
    port = free_port()
    server = aiosmtpd_controller.Controller(inbox, hostname="127.0.0.1", port=port)
    server.start()
    try:
        with override_settings(
            EMAIL_BACKEND="django.core.mail.backends.smtp.EmailBackend",
            EMAIL_HOST="127.0.0.1",
            EMAIL_PORT=port,
            EMAIL_USE_TLS=False,
            EMAIL_TIMEOUT=5,
            DEFAULT_FROM_EMAIL="orders@shop.example",
        ):
            yield inbox
    finally:
        server.stop()


@pytest.fixture
def customer(catalogue: dict[str, Any]) -> Customer:
    customer: Customer = catalogue["CUST-1"]
    customer.email = "ada@example.com"
    customer.save(update_fields=["email"])
    return customer


def order_placed(event: dict[str, Any]) -> OutboxMessage:
    """The OrderPlaced message the PlaceOrder *event* stored."""
    derived = derived_event_id(event["eventId"], "OrderPlaced")
    return OutboxMessage.objects.get(task_name=send_order_confirmation.name, event_id=derived)


def test_an_accepted_order_stores_its_order_placed_message_with_a_derived_id(
    customer: Customer,
) -> None:
    event = place_order_event()
    deliver(place_order, event)
    message = order_placed(event)
    placed = message.args[0]
    assert placed["eventId"] == derived_event_id(event["eventId"], "OrderPlaced")
    assert message.event_id == placed["eventId"]
    assert placed["email"] == "ada@example.com"
    assert placed["orderId"] == event["orderId"]


def test_the_derived_id_is_the_same_for_every_delivery_and_distinct_per_purpose() -> None:
    incoming = str(uuid.uuid4())
    assert derived_event_id(incoming, "OrderPlaced") == derived_event_id(incoming, "OrderPlaced")
    assert derived_event_id(incoming, "OrderPlaced") != derived_event_id(incoming, "Invoice")
    assert derived_event_id(incoming, "OrderPlaced") != derived_event_id(str(uuid.uuid4()), "x")
    uuid.UUID(derived_event_id(incoming, "OrderPlaced"))  # a valid key, and a UUID


def test_a_rejected_order_or_a_customer_without_email_emits_nothing(
    catalogue: dict[str, Any],
) -> None:
    deliver(place_order, place_order_event())  # CUST-1 has no email
    deliver(place_order, place_order_event(customerId="NOBODY"))
    assert not OutboxMessage.objects.exists()


def test_an_order_that_rolls_back_emits_nothing(customer: Customer) -> None:
    event = place_order_event()
    with pytest.raises(RuntimeError), idempotent("tests.rollback", event["eventId"]):
        services.place_order(event)
        raise RuntimeError("the effect rolls back, its outgoing message with it")
    assert not OutboxMessage.objects.exists()
    assert not Order.objects.exists()


def test_the_confirmation_is_sent_once_with_a_message_id_from_the_event(
    customer: Customer, smtp: Inbox
) -> None:
    event = place_order_event()
    deliver(place_order, event)
    placed = order_placed(event).args[0]
    first = deliver(send_order_confirmation, placed)
    again = deliver(send_order_confirmation, placed)  # the relay published it again
    assert again == first
    assert len(smtp.messages) == 1
    sent = smtp.messages[0]
    assert sent["To"] == "ada@example.com"
    assert sent["Message-ID"] == f"<{placed['eventId']}@shop.example>"
    assert event["orderId"] in sent["Subject"]
    record = ConfirmationEmail.objects.get()
    assert (record.message_id, record.recipient) == (sent["Message-ID"], "ada@example.com")
    assert str(record.original_event_id) == placed["eventId"]
    consumer = send_order_confirmation.name
    assert ProcessedEvent.objects.for_consumer(consumer).count() == 1


def test_a_failed_send_records_nothing_and_is_tried_again(customer: Customer) -> None:
    event = place_order_event()
    deliver(place_order, event)
    placed = order_placed(event).args[0]
    port = free_port()  # nothing listens there
    with (
        override_settings(
            EMAIL_BACKEND="django.core.mail.backends.smtp.EmailBackend",
            EMAIL_HOST="127.0.0.1",
            EMAIL_PORT=port,
            EMAIL_TIMEOUT=2,
        ),
        pytest.raises(ConnectionRefusedError),
        idempotent(send_order_confirmation.name, placed["eventId"]),
    ):
        services.send_order_confirmation(placed)
    assert not ConfirmationEmail.objects.exists()
    assert not ProcessedEvent.objects.for_consumer(send_order_confirmation.name).exists()


def test_after_an_inbox_purge_the_recorded_send_is_not_repeated(
    customer: Customer, smtp: Inbox
) -> None:
    event = place_order_event()
    deliver(place_order, event)
    placed = order_placed(event).args[0]
    deliver(send_order_confirmation, placed)
    ProcessedEvent.objects.for_consumer(send_order_confirmation.name).delete()
    deliver(send_order_confirmation, placed)
    assert len(smtp.messages) == 1
    assert ConfirmationEmail.objects.count() == 1
