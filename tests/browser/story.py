"""Fifty mixed events, as an operator finds them: posted through the API, then delivered.

Every event goes the real way up to the broker: ``POST /api/events/`` stores it in the outbox,
the publish after the commit marks it published (the Celery app is a mock: nothing leaves the
process), and then each is delivered to its task in-process, as a worker would. What results is
what production shows: orders, payments, debits and shipments; rejections; duplicates
discarded; two payload mismatches; a payment for an order that never existed, retried until it
became a dead letter.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from rest_framework.test import APIClient

from idempotency.models import OutboxMessage
from orders.events import EVENT_TYPES
from tests.celery_app import mocked_celery_app
from tests.factories import (
    CustomerFactory,
    ProductFactory,
    debit_account_event,
    order_shipped_event,
    payment_received_event,
    place_order_event,
)

#: The order no PlaceOrder ever named.
GHOST_ORDER = "ORD-GHOST"


@dataclass
class Story:
    events: list[dict[str, Any]] = field(default_factory=list)
    #: The one to follow on the per-event page: placed, paid, shipped, delivered twice.
    followed: dict[str, Any] = field(default_factory=dict)
    #: The payment for an order that never existed (a dead letter after its retries).
    ghost_payment: dict[str, Any] = field(default_factory=dict)
    #: The first delivery of an event whose id came back with another payload.
    mismatched: dict[str, Any] = field(default_factory=dict)
    #: The event of an order placed through ``POST /api/orders/`` with an Idempotency-Key.
    keyed_event_id: str = ""


def _event_id(n: int) -> str:
    return str(uuid.UUID(int=0xE0E0_0000_0000_4000_8000_0000_0000_0000 + n))


def build(client: APIClient) -> Story:
    """Post the fifty events and deliver each (the duplicates and mismatches twice)."""
    ProductFactory(product_id="PROD-A", price=Decimal("10.00"), stock=1000)
    ProductFactory(product_id="PROD-B", price=Decimal("25.00"), stock=1)
    CustomerFactory(customer_id="CUST-1", balance=Decimal("100.00"))
    CustomerFactory(customer_id="CUST-2", balance=Decimal("5.00"))
    story = Story()
    n = iter(range(1000))
    orders = []
    for i in range(12):
        order_id = f"ORD-{i + 1:03d}"
        orders.append(order_id)
        story.events.append(
            place_order_event(eventId=_event_id(next(n)), orderId=order_id, customerId="CUST-1")
        )
    # Rejected: the last unit of PROD-B is taken by the first; an unknown product; no customer.
    story.events += [
        place_order_event(
            eventId=_event_id(next(n)),
            orderId=f"ORD-B{i}",
            items=[{"productId": "PROD-B", "quantity": 1}],
        )
        for i in range(2)
    ]
    story.events.append(
        place_order_event(
            eventId=_event_id(next(n)),
            orderId="ORD-X1",
            items=[{"productId": "PROD-NONE", "quantity": 1}],
        )
    )
    story.events.append(
        place_order_event(eventId=_event_id(next(n)), orderId="ORD-X2", customerId="CUST-NONE")
    )
    for i, order_id in enumerate(orders[:10]):
        story.events.append(
            payment_received_event(
                eventId=_event_id(next(n)), orderId=order_id, paymentId=f"PAY-{i}", amount="20.00"
            )
        )
    story.ghost_payment = payment_received_event(
        eventId=_event_id(next(n)), orderId=GHOST_ORDER, paymentId="PAY-G", amount="5.00"
    )
    story.events.append(story.ghost_payment)
    for i in range(8):
        story.events.append(
            debit_account_event(eventId=_event_id(next(n)), amount="3.00", reason=f"fee {i}")
        )
    # Rejected: it would overdraw CUST-2.
    story.events.append(
        debit_account_event(eventId=_event_id(next(n)), customerId="CUST-2", amount="50.00")
    )
    for i, order_id in enumerate(orders[:6]):
        story.events.append(
            order_shipped_event(
                eventId=_event_id(next(n)), orderId=order_id, trackingNumber=f"TRK-{i}"
            )
        )
    # Rejected: ORD-012 was never paid.
    story.events.append(
        order_shipped_event(eventId=_event_id(next(n)), orderId=orders[11], trackingNumber="TRK-X")
    )
    story.followed = story.events[0]
    story.mismatched = story.events[16]  # the first payment
    first_debit = story.events[27]
    # Delivered again: five duplicates, and two ids that come back with another payload.
    again = [story.events[i] for i in (0, 0, 1, 16, 27)]
    mismatches = [
        {**story.mismatched, "amount": "99.00"},
        {**first_debit, "amount": "7.00"},
    ]
    posted = [*story.events, *again, *mismatches]
    assert len(posted) == 50, len(posted)  # 43 events, 5 duplicates, 2 mismatches
    with mocked_celery_app():
        for event in posted:
            response = client.post("/api/events/", event, format="json")
            assert response.status_code == 202, response.content
        keyed = client.post(
            "/api/orders/",
            {"customerId": "CUST-1", "items": [{"productId": "PROD-A", "quantity": 1}]},
            format="json",
            HTTP_IDEMPOTENCY_KEY="checkout-7f3a",
        )
        assert keyed.status_code == 202, keyed.content
    story.keyed_event_id = keyed.json()["requestId"]
    [message] = OutboxMessage.objects.filter(event_id=story.keyed_event_id)
    for event in [*posted, *message.args]:
        task = EVENT_TYPES[event["eventType"]].task
        # As a worker would: an out-of-order event is retried, then dead-lettered.
        task.apply(args=[event], throw=False)
    return story
