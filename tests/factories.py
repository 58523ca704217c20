from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Any

import factory
from django.contrib.auth import get_user_model

from idempotency.models import ProcessedEvent
from orders.models import Customer, LedgerEntry, Order, OrderItem, Payment, Product


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = get_user_model()
        django_get_or_create = ("username",)

    username = factory.Sequence(lambda n: f"user{n}")
    password = factory.django.Password("not-a-real-password")


class ProductFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Product

    product_id = factory.Sequence(lambda n: f"PROD-{n}")
    name = factory.Faker("word")
    price = Decimal("10.00")
    stock = 100


class CustomerFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Customer

    customer_id = factory.Sequence(lambda n: f"CUST-{n}")
    name = factory.Faker("name")
    balance = Decimal("100.00")


class OrderFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Order

    order_id = factory.Sequence(lambda n: f"ORD-{n}")
    customer = factory.SubFactory(CustomerFactory)
    requested_customer_id = factory.LazyAttribute(lambda o: o.customer.customer_id)
    status = Order.Status.ACCEPTED
    original_event_id = factory.LazyFunction(uuid.uuid4)


class OrderItemFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = OrderItem

    order = factory.SubFactory(OrderFactory)
    product = factory.SubFactory(ProductFactory)
    quantity = 1
    unit_price = factory.LazyAttribute(lambda o: o.product.price)


class ProcessedEventFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = ProcessedEvent

    consumer = "tests.consumer"
    event_id = factory.LazyFunction(lambda: str(uuid.uuid4()))


def place_order_event(**overrides: Any) -> dict[str, Any]:
    """A PlaceOrder event in the wire format."""
    event: dict[str, Any] = {
        "eventType": "PlaceOrder",
        "eventId": str(uuid.uuid4()),
        "orderId": f"ORD-{uuid.uuid4().hex[:8]}",
        "customerId": "CUST-1",
        "items": [{"productId": "PROD-A", "quantity": 2}],
        "timestamp": "2023-10-27T10:00:00Z",
    }
    event.update(overrides)
    return event


def _event(event_type: str, **fields: Any) -> dict[str, Any]:
    return {
        "eventType": event_type,
        "eventId": str(uuid.uuid4()),
        "timestamp": "2023-10-27T10:00:00Z",
        **fields,
    }


def payment_received_event(**overrides: Any) -> dict[str, Any]:
    fields = {"orderId": "ORD-1", "paymentId": "PAY-1", "amount": "20.00", "currency": "USD"}
    return _event("PaymentReceived", **{**fields, **overrides})


def debit_account_event(**overrides: Any) -> dict[str, Any]:
    fields = {"customerId": "CUST-1", "amount": "10.00", "reason": "monthly fee"}
    return _event("DebitAccount", **{**fields, **overrides})


def order_shipped_event(**overrides: Any) -> dict[str, Any]:
    return _event("OrderShipped", **{"orderId": "ORD-1", "trackingNumber": "TRK-1", **overrides})


class PaymentFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Payment

    order = factory.SubFactory(OrderFactory)
    payment_id = factory.Sequence(lambda n: f"PAY-{n}")
    amount = Decimal("10.00")
    currency = "USD"
    original_event_id = factory.LazyFunction(uuid.uuid4)


class LedgerEntryFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = LedgerEntry

    customer = factory.SubFactory(CustomerFactory)
    amount = Decimal("-10.00")
    reason = "fee"
    balance_after = Decimal("90.00")
    original_event_id = factory.LazyFunction(uuid.uuid4)
