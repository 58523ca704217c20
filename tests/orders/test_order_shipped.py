"""OrderShipped: naturally idempotent (it sets a value), recorded all the same."""

from __future__ import annotations

from decimal import Decimal

import pytest
from celery.exceptions import Retry

from idempotency.models import ProcessedEvent
from orders.models import Order
from orders.tasks import ship_order
from tests.factories import OrderFactory, order_shipped_event
from tests.orders.helpers import deliver

pytestmark = pytest.mark.django_db


def test_a_paid_order_ships() -> None:
    order = OrderFactory(order_id="ORD-1", status=Order.Status.PAID)
    event = order_shipped_event()
    result = deliver(ship_order, event)
    assert result == {"orderId": "ORD-1", "status": "shipped", "trackingNumber": "TRK-1"}
    order.refresh_from_db()
    assert (order.status, order.tracking_number) == (Order.Status.SHIPPED, "TRK-1")
    assert order.shipped_at is not None
    assert deliver(ship_order, event) == result
    assert ProcessedEvent.objects.for_event(event["eventId"]).count() == 1


def test_a_new_tracking_number_replaces_the_old_one() -> None:
    OrderFactory(order_id="ORD-1", status=Order.Status.PAID)
    deliver(ship_order, order_shipped_event(trackingNumber="TRK-1"))
    deliver(ship_order, order_shipped_event(trackingNumber="TRK-2"))
    assert Order.objects.get().tracking_number == "TRK-2"


def test_an_unpaid_order_does_not_ship() -> None:
    OrderFactory(order_id="ORD-1", total=Decimal("50.00"), paid_amount=Decimal("20.00"))
    result = deliver(ship_order, order_shipped_event())
    assert result["status"] == "rejected"
    assert result["reason"] == "order ORD-1 cannot ship: it is not paid (20.00 of 50.00)"
    assert Order.objects.get().status == Order.Status.ACCEPTED


def test_a_rejected_order_does_not_ship() -> None:
    OrderFactory(order_id="ORD-1", status=Order.Status.REJECTED, reason="unknown customer C")
    result = deliver(ship_order, order_shipped_event())
    assert result["reason"] == "order ORD-1 cannot ship: it was rejected: unknown customer C"


def test_shipping_an_order_not_placed_yet_is_retried() -> None:
    with pytest.raises(Retry):
        deliver(ship_order, order_shipped_event(orderId="ORD-LATE"))
    assert not ProcessedEvent.objects.exists()
