"""Every final rejection outlives the inbox: after a purge, a redelivery is rejected again.

Each test rejects an event, purges the inbox (as the daily purge does once the retention has
passed), changes the data so that the event would now succeed, and redelivers it.
"""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from idempotency.entities import rows_for_event
from idempotency.models import Outcome, ProcessedEvent
from orders.models import Customer, LedgerEntry, Order, Payment, Rejection
from orders.tasks import debit_account, payment_received, place_order, ship_order
from tests.factories import (
    CustomerFactory,
    OrderFactory,
    ProductFactory,
    debit_account_event,
    order_shipped_event,
    payment_received_event,
    place_order_event,
)
from tests.orders.helpers import deliver

pytestmark = pytest.mark.django_db


def purge_the_inbox() -> None:
    purged = ProcessedEvent.objects.purge(before=timezone.now() + timedelta(days=1))
    assert purged >= 1
    assert not ProcessedEvent.objects.exists()


def rejected_again(event_id: str, reason: str) -> None:
    record = ProcessedEvent.objects.for_event(event_id).get()
    assert (record.outcome, record.reason) == (Outcome.REJECTED, reason)


def test_a_debit_refused_for_its_balance_is_not_applied_after_a_top_up_and_a_purge() -> None:
    customer = CustomerFactory(customer_id="CUST-1", balance=Decimal("5.00"))
    event = debit_account_event(amount="10.00")
    first = deliver(debit_account, event)
    assert first["status"] == "rejected"
    rejection = Rejection.objects.get()
    assert (str(rejection.original_event_id), rejection.consumer) == (
        event["eventId"],
        debit_account.name,
    )
    assert rejection in rows_for_event(event["eventId"])  # shown with the event in the admin

    Customer.objects.filter(pk=customer.pk).update(balance=Decimal("100.00"))
    purge_the_inbox()
    assert deliver(debit_account, event) == first
    customer.refresh_from_db()
    assert customer.balance == Decimal("100.00")  # no debit
    assert not LedgerEntry.objects.exists()
    rejected_again(event["eventId"], first["reason"])
    assert Rejection.objects.count() == 1


def test_a_debit_of_an_unknown_customer_stays_refused_once_the_customer_exists() -> None:
    event = debit_account_event(customerId="CUST-9", amount="10.00")
    first = deliver(debit_account, event)
    assert first["reason"] == "unknown customer CUST-9"
    CustomerFactory(customer_id="CUST-9", balance=Decimal("50.00"))
    purge_the_inbox()
    assert deliver(debit_account, event) == first
    assert Customer.objects.get(customer_id="CUST-9").balance == Decimal("50.00")


def test_a_shipment_refused_for_an_unpaid_order_does_not_ship_it_once_paid() -> None:
    order = OrderFactory(order_id="ORD-1", status=Order.Status.ACCEPTED, total=Decimal("10.00"))
    event = order_shipped_event()
    first = deliver(ship_order, event)
    assert first["status"] == "rejected"
    Order.objects.filter(pk=order.pk).update(status=Order.Status.PAID)
    purge_the_inbox()
    assert deliver(ship_order, event) == first
    order.refresh_from_db()
    assert (order.status, order.tracking_number, order.shipped_at) == (Order.Status.PAID, "", None)
    rejected_again(event["eventId"], first["reason"])


def test_a_payment_refused_for_a_rejected_order_stays_refused() -> None:
    order = OrderFactory(order_id="ORD-1", status=Order.Status.REJECTED, reason="no stock")
    event = payment_received_event()
    first = deliver(payment_received, event)
    assert first["status"] == "rejected"
    # Even if the order were somehow accepted later, the refused payment is never applied.
    Order.objects.filter(pk=order.pk).update(status=Order.Status.ACCEPTED, reason="")
    purge_the_inbox()
    assert deliver(payment_received, event) == first
    assert not Payment.objects.exists()
    order.refresh_from_db()
    assert order.paid_amount == Decimal("0.00")
    rejected_again(event["eventId"], first["reason"])


def test_a_payment_in_another_currency_stays_refused() -> None:
    OrderFactory(order_id="ORD-1", status=Order.Status.ACCEPTED)
    event = payment_received_event(currency="EUR")
    first = deliver(payment_received, event)
    purge_the_inbox()
    assert deliver(payment_received, event) == first
    assert not Payment.objects.exists()


def test_an_order_refused_for_its_order_id_stays_refused_and_is_recorded() -> None:
    ProductFactory(product_id="PROD-A", stock=10)
    CustomerFactory(customer_id="CUST-1")
    deliver(place_order, place_order_event(orderId="ORD-X"))
    reused = place_order_event(orderId="ORD-X")
    first = deliver(place_order, reused)
    assert first["reason"] == "order ORD-X already exists"
    assert Rejection.objects.get().reason == first["reason"]
    purge_the_inbox()
    assert deliver(place_order, reused) == first
    assert Order.objects.count() == 1
    rejected_again(reused["eventId"], first["reason"])


def test_an_order_refused_for_stock_is_kept_by_its_own_row() -> None:
    ProductFactory(product_id="PROD-A", stock=1)
    CustomerFactory(customer_id="CUST-1")
    event = place_order_event(items=[{"productId": "PROD-A", "quantity": 2}])
    first = deliver(place_order, event)
    assert first["status"] == "rejected"
    ProductFactory._meta.model.objects.update(stock=10)
    purge_the_inbox()
    assert deliver(place_order, event)["status"] == "rejected"
    order = Order.objects.get()
    assert order.status == Order.Status.REJECTED
    assert ProductFactory._meta.model.objects.get().stock == 10  # no stock taken
