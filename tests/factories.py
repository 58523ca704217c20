from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Any

import factory
from django.contrib.auth import get_user_model

from idempotency.models import ProcessedEvent
from orders.models import Customer, Order, OrderItem, Product


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
