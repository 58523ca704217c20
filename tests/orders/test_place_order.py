"""PlaceOrder: a create guarded by the entity's own key, stock taken in the same transaction."""

from __future__ import annotations

from typing import Any

import pytest

from idempotency.models import Outcome, ProcessedEvent
from orders.models import Order, Product
from orders.tasks import place_order
from tests.factories import place_order_event

pytestmark = pytest.mark.django_db


def deliver(event: dict[str, Any]) -> Any:
    """Run the task body as a worker would (no broker)."""
    return place_order.apply(args=[event]).get()


def test_places_the_order_and_takes_stock(catalogue: dict[str, Any]) -> None:
    event = place_order_event(
        items=[{"productId": "PROD-A", "quantity": 2}, {"productId": "PROD-B", "quantity": 1}]
    )
    result = deliver(event)
    order = Order.objects.get()
    assert result == {"orderId": order.order_id, "status": "accepted", "reason": ""}
    assert str(order.original_event_id) == event["eventId"]
    assert order.total == 2 * catalogue["PROD-A"].price + catalogue["PROD-B"].price
    assert sorted(order.items.values_list("product__product_id", "quantity")) == [
        ("PROD-A", 2),
        ("PROD-B", 1),
    ]
    assert Product.objects.get(product_id="PROD-A").stock == 98
    assert Product.objects.get(product_id="PROD-B").stock == 49


def test_a_redelivery_changes_nothing_and_returns_the_same_result(
    catalogue: dict[str, Any],
) -> None:
    event = place_order_event()
    first = deliver(event)
    assert deliver(event) == first
    assert deliver(event) == first
    assert Order.objects.count() == 1
    assert Product.objects.get(product_id="PROD-A").stock == 98
    assert ProcessedEvent.objects.count() == 1


def test_the_entity_key_guards_even_when_the_inbox_forgot(catalogue: dict[str, Any]) -> None:
    event = place_order_event()
    deliver(event)
    ProcessedEvent.objects.all().delete()  # as a purge would
    deliver(event)
    assert Order.objects.count() == 1
    assert Product.objects.get(product_id="PROD-A").stock == 98


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"customerId": "CUST-404"}, "unknown customer CUST-404"),
        ({"items": [{"productId": "PROD-404", "quantity": 1}]}, "unknown product(s): PROD-404"),
        ({"items": [{"productId": "PROD-B", "quantity": 51}]}, "insufficient stock for PROD-B"),
    ],
)
def test_rejections_are_final_and_leave_stock_untouched(
    catalogue: dict[str, Any], overrides: dict[str, Any], reason: str
) -> None:
    event = place_order_event(**overrides)
    assert deliver(event)["status"] == "rejected"
    order = Order.objects.get()
    assert (order.status, order.reason) == ("rejected", reason)
    record = ProcessedEvent.objects.get()
    assert (record.outcome, record.reason) == (Outcome.REJECTED, reason)
    assert Product.objects.get(product_id="PROD-A").stock == 100
    assert Product.objects.get(product_id="PROD-B").stock == 50


def test_a_shortfall_on_a_later_item_gives_back_the_earlier_ones(catalogue: dict[str, Any]) -> None:
    event = place_order_event(
        items=[{"productId": "PROD-A", "quantity": 5}, {"productId": "PROD-B", "quantity": 999}]
    )
    assert deliver(event)["status"] == "rejected"
    assert Product.objects.get(product_id="PROD-A").stock == 100


def test_a_reused_order_id_under_a_new_event_id_is_rejected(catalogue: dict[str, Any]) -> None:
    first = place_order_event(orderId="ORD-1")
    deliver(first)
    second = place_order_event(orderId="ORD-1")
    assert deliver(second) == {
        "orderId": "ORD-1",
        "status": "rejected",
        "reason": "order ORD-1 already exists",
    }
    assert Order.objects.count() == 1
    assert Product.objects.get(product_id="PROD-A").stock == 98
