"""The business logic of each event. Each function runs inside the claim's transaction."""

from __future__ import annotations

import logging
from collections import Counter
from decimal import Decimal
from typing import Any

from django.db import IntegrityError, transaction
from django.db.models import F

from idempotency.entities import create_once
from idempotency.inbox import reject

from .models import Customer, Order, OrderItem, Product

logger = logging.getLogger("orders")


class InsufficientStock(Exception):
    def __init__(self, product_id: str) -> None:
        super().__init__(f"insufficient stock for {product_id}")


def order_summary(order: Order) -> dict[str, Any]:
    """What the PlaceOrder task returns, and what a duplicate delivery returns again."""
    return {"orderId": order.order_id, "status": order.status, "reason": order.reason}


def place_order(event: dict[str, Any]) -> dict[str, Any]:
    """Create the order and take its stock, or record it as rejected: a final outcome."""
    wanted = Counter[str]()
    for item in event["items"]:
        wanted[item["productId"]] += item["quantity"]
    try:
        order, created = create_once(
            Order,
            event["eventId"],
            defaults={
                "order_id": event["orderId"],
                "requested_customer_id": event["customerId"],
                "status": Order.Status.REJECTED,  # until the stock is taken below
            },
        )
    except IntegrityError:
        # Another event already created this orderId: the producer reused it under a new id.
        reason = f"order {event['orderId']} already exists"
        reject(reason)
        return {"orderId": event["orderId"], "status": Order.Status.REJECTED, "reason": reason}
    if not created:
        # The entity key caught a redelivery the inbox no longer remembers (it was purged).
        return order_summary(order)

    customer = Customer.objects.filter(customer_id=event["customerId"]).first()
    products = Product.objects.in_bulk(list(wanted), field_name="product_id")
    missing = sorted(set(wanted) - set(products))
    if customer is None:
        return _reject(order, f"unknown customer {event['customerId']}")
    if missing:
        return _reject(order, f"unknown product(s): {', '.join(missing)}")
    try:
        _take_stock(products, wanted)
    except InsufficientStock as exc:
        return _reject(order, str(exc))

    OrderItem.objects.bulk_create(
        OrderItem(order=order, product=products[pid], quantity=qty, unit_price=products[pid].price)
        for pid, qty in wanted.items()
    )
    order.customer = customer
    order.status = Order.Status.ACCEPTED
    order.total = sum(
        (products[pid].price * qty for pid, qty in wanted.items()), start=Decimal("0.00")
    )
    order.save(update_fields=["customer", "status", "total"])
    return order_summary(order)


def _take_stock(products: dict[str, Product], wanted: Counter[str]) -> None:
    # A savepoint, so running short on the second product gives back the first one's units.
    # Rows are locked in product-id order so two orders can never deadlock on each other.
    with transaction.atomic():
        for pid in sorted(wanted):
            taken = Product.objects.filter(pk=products[pid].pk, stock__gte=wanted[pid]).update(
                stock=F("stock") - wanted[pid]
            )
            if not taken:
                raise InsufficientStock(pid)


def _reject(order: Order, reason: str) -> dict[str, Any]:
    order.status = Order.Status.REJECTED
    order.reason = reason
    order.save(update_fields=["status", "reason"])
    reject(reason)
    logger.info("order %s rejected: %s", order.order_id, reason)
    return order_summary(order)
