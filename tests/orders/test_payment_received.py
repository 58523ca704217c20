"""PaymentReceived: an increment guarded by the inbox and by the (orderId, paymentId) key."""

from __future__ import annotations

from decimal import Decimal

import pytest
from celery.exceptions import Retry

from idempotency.models import Outcome, ProcessedEvent
from orders.models import Order, Payment
from orders.tasks import payment_received
from tests.factories import OrderFactory, payment_received_event
from tests.orders.helpers import deliver

pytestmark = pytest.mark.django_db


@pytest.fixture
def order() -> Order:
    return OrderFactory(order_id="ORD-1", total=Decimal("50.00"))


def test_a_payment_adds_to_the_paid_amount(order: Order) -> None:
    result = deliver(payment_received, payment_received_event(amount="20.00"))
    order.refresh_from_db()
    assert order.paid_amount == Decimal("20.00")
    assert order.status == Order.Status.ACCEPTED
    assert result == {
        "orderId": "ORD-1",
        "paymentId": "PAY-1",
        "status": "accepted",
        "paidAmount": "20.00",
    }
    assert Payment.objects.get().amount == Decimal("20.00")


def test_the_order_is_paid_once_covered(order: Order) -> None:
    deliver(payment_received, payment_received_event(paymentId="PAY-1", amount="20.00"))
    deliver(payment_received, payment_received_event(paymentId="PAY-2", amount="30.00"))
    order.refresh_from_db()
    assert (order.paid_amount, order.status) == (Decimal("50.00"), Order.Status.PAID)


def test_a_redelivery_adds_nothing(order: Order) -> None:
    event = payment_received_event()
    first = deliver(payment_received, event)
    assert deliver(payment_received, event) == first
    order.refresh_from_db()
    assert order.paid_amount == Decimal("20.00")
    assert Payment.objects.count() == 1


def test_the_same_payment_under_a_new_event_id_is_caught_by_the_business_key(
    order: Order,
) -> None:
    first = payment_received_event()
    deliver(payment_received, first)
    resent = payment_received_event()  # same orderId + paymentId, new eventId
    result = deliver(payment_received, resent)
    assert result["status"] == "rejected"
    assert f"already applied by event {first['eventId']}" in result["reason"]
    order.refresh_from_db()
    assert order.paid_amount == Decimal("20.00")
    record = ProcessedEvent.objects.get(event_id=resent["eventId"])
    assert record.outcome == Outcome.REJECTED


def test_a_payment_for_a_rejected_order_is_rejected() -> None:
    OrderFactory(order_id="ORD-1", status=Order.Status.REJECTED, reason="insufficient stock")
    result = deliver(payment_received, payment_received_event())
    assert result["status"] == "rejected"
    assert "was rejected: insufficient stock" in result["reason"]
    assert not Payment.objects.exists()


def test_another_currency_is_rejected(order: Order) -> None:
    result = deliver(payment_received, payment_received_event(currency="EUR"))
    assert result["reason"] == "currency EUR is not the order's USD"
    order.refresh_from_db()
    assert order.paid_amount == 0


def test_a_payment_before_its_order_is_retried_not_lost() -> None:
    event = payment_received_event(orderId="ORD-LATE")
    with pytest.raises(Retry):
        deliver(payment_received, event)
    assert not ProcessedEvent.objects.exists()  # the claim rolled back: the retry is fresh
    OrderFactory(order_id="ORD-LATE", total=Decimal("20.00"))
    assert deliver(payment_received, event)["status"] == "paid"
    assert payment_received.max_retries == 10


def test_the_payment_row_guards_when_the_inbox_forgot(order: Order) -> None:
    event = payment_received_event()
    first = deliver(payment_received, event)
    ProcessedEvent.objects.all().delete()  # as a purge would
    assert deliver(payment_received, event) == first
    order.refresh_from_db()
    assert order.paid_amount == Decimal("20.00")
    assert ProcessedEvent.objects.get().outcome == Outcome.PROCESSED
