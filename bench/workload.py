"""The business transaction every benchmark measures: an order, two items, two stock updates."""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal

from django.db.models import F

from orders.models import Order, OrderItem, Product

PRICE = Decimal("15.00")


def place(product_pks: Sequence[int], customer_pk: int, event_id: str) -> None:
    """The writes of a PlaceOrder; the caller provides the transaction."""
    order = Order.objects.create(
        original_event_id=event_id,
        order_id=event_id,
        customer_id=customer_pk,
        requested_customer_id=str(customer_pk),
        status=Order.Status.ACCEPTED,
        total=PRICE * len(product_pks),
    )
    OrderItem.objects.bulk_create(
        OrderItem(order=order, product_id=pk, quantity=1, unit_price=PRICE) for pk in product_pks
    )
    for pk in product_pks:
        Product.objects.filter(pk=pk).update(stock=F("stock") - 1)
