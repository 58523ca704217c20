"""The event types the service accepts: each one's serializer and the task that consumes it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import serializers, tasks


@dataclass(frozen=True)
class EventType:
    serializer: type[serializers.EventSerializer]
    task: Any
    description: str


EVENT_TYPES: dict[str, EventType] = {
    "PlaceOrder": EventType(
        serializers.PlaceOrderSerializer,
        tasks.place_order,
        "Create an order and take its stock; rejected (finally) if stock, a product or the "
        "customer is missing. Keyed by the order's own original_event_id.",
    ),
    "PaymentReceived": EventType(
        serializers.PaymentReceivedSerializer,
        tasks.payment_received,
        "Add a payment to an order; the order becomes paid once fully covered. Guarded by the "
        "inbox and by the unique (orderId, paymentId) pair.",
    ),
    "DebitAccount": EventType(
        serializers.DebitAccountSerializer,
        tasks.debit_account,
        "Deduct an amount from a customer's balance once; rejected (finally) if it would "
        "overdraw the account.",
    ),
    "OrderShipped": EventType(
        serializers.OrderShippedSerializer,
        tasks.ship_order,
        "Set a paid order's tracking number; rejected for an unpaid or rejected order.",
    ),
}
