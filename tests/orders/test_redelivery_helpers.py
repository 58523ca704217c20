"""PlaceOrder delivered twice at once and again after a crash, through idempotency.testing."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from django.db import connection

from idempotency.testing import (
    Deliveries,
    SimulatedCrash,
    assert_applied_once,
)
from orders.models import Order, Product
from orders.tasks import place_order
from tests.factories import place_order_event

CONSUMER = "orders.tasks.place_order"


@pytest.mark.django_db(transaction=True)
def test_two_workers_delivering_the_same_order_at_once_place_it_once(
    deliver_concurrently: Callable[..., Deliveries], catalogue: dict
) -> None:
    if connection.vendor != "postgresql":
        pytest.skip("two writers at once need PostgreSQL (SQLite takes one writer at a time)")
    event = place_order_event(items=[{"productId": "PROD-A", "quantity": 2}])
    outcome = deliver_concurrently(place_order, event)
    outcome.assert_applied_once()
    assert (outcome.processed, outcome.discarded) == (1, 1)
    assert Order.objects.filter(order_id=event["orderId"]).count() == 1
    assert Product.objects.get(product_id="PROD-A").stock == 98
    assert_applied_once(CONSUMER, event["eventId"])


@pytest.mark.django_db(transaction=True)
def test_a_worker_killed_before_commit_leaves_nothing_and_the_redelivery_places_the_order(
    deliver_after_crash: Callable[..., Deliveries], catalogue: dict
) -> None:
    event = place_order_event(items=[{"productId": "PROD-A", "quantity": 2}])
    outcome = deliver_after_crash(place_order, event)
    first, second = outcome.deliveries
    assert isinstance(first.error, SimulatedCrash)
    assert second.error is None
    assert second.result["status"] == "accepted"
    outcome.assert_applied_once()
    assert Order.objects.filter(order_id=event["orderId"]).count() == 1
    assert Product.objects.get(product_id="PROD-A").stock == 98


@pytest.mark.django_db
def test_the_crash_works_inside_a_test_transaction_too(
    deliver_after_crash: Callable[..., Deliveries], catalogue: dict
) -> None:
    """Under TestCase (pytest-django's db), the delivery's outermost savepoint is its commit."""
    event = place_order_event(items=[{"productId": "PROD-B", "quantity": 1}])
    outcome = deliver_after_crash(place_order, event)
    outcome.assert_applied_once()
    assert Product.objects.get(product_id="PROD-B").stock == 49
