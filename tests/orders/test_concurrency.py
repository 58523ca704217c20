"""The last units of a product, ordered by concurrent workers on PostgreSQL: never oversold."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from django.db import connections

from orders import services
from orders.models import Order, Product
from orders.tasks import place_order
from tests.factories import CustomerFactory, ProductFactory, place_order_event
from tests.services import lock_waiters, require_postgres, wait_for

pytestmark = [pytest.mark.services, pytest.mark.django_db(transaction=True)]

TIMEOUT = 20


@pytest.fixture(autouse=True)
def _postgres() -> None:
    require_postgres()
    CustomerFactory(customer_id="CUST-1")


def deliver_in_thread(event: dict[str, Any]) -> Any:
    try:
        return place_order.apply(args=[event], throw=True).get()
    finally:
        connections.close_all()


def test_the_second_order_waits_for_the_first_and_finds_the_stock_gone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ProductFactory(product_id="PROD-A", stock=3)
    took_stock, release = threading.Event(), threading.Event()
    original: Callable[..., None] = services._take_stock

    def take_stock_then_pause(*args: Any) -> None:
        original(*args)
        if not took_stock.is_set():  # only the first order pauses, holding its row lock
            took_stock.set()
            assert release.wait(TIMEOUT)

    monkeypatch.setattr(services, "_take_stock", take_stock_then_pause)
    first = place_order_event(items=[{"productId": "PROD-A", "quantity": 2}])
    second = place_order_event(items=[{"productId": "PROD-A", "quantity": 2}])
    with ThreadPoolExecutor(2) as pool:
        first_result = pool.submit(deliver_in_thread, first)
        assert took_stock.wait(TIMEOUT)
        second_result = pool.submit(deliver_in_thread, second)
        wait_for(lambda: lock_waiters() >= 1, TIMEOUT, "the second order to wait")
        release.set()
        results = [first_result.result(TIMEOUT), second_result.result(TIMEOUT)]
    assert [r["status"] for r in results] == ["accepted", "rejected"]
    assert results[1]["reason"] == "insufficient stock for PROD-A"
    assert Product.objects.get().stock == 1


@pytest.mark.parametrize("attempt", range(3))
def test_a_stampede_sells_exactly_the_stock(attempt: int) -> None:
    ProductFactory(product_id="PROD-A", stock=5)
    ProductFactory(product_id="PROD-B", stock=100)
    events = [
        place_order_event(
            items=[{"productId": "PROD-B", "quantity": 1}, {"productId": "PROD-A", "quantity": 1}]
        )
        for _ in range(12)
    ]
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(deliver_in_thread, events, timeout=60))
    statuses = sorted(r["status"] for r in results)
    assert statuses == ["accepted"] * 5 + ["rejected"] * 7
    assert Product.objects.get(product_id="PROD-A").stock == 0
    assert Product.objects.get(product_id="PROD-B").stock == 95  # rejected orders gave it back
    assert Order.objects.filter(status=Order.Status.ACCEPTED).count() == 5
