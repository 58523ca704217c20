"""Wire format of the events (camelCase JSON) and of the read endpoints."""

from __future__ import annotations

from typing import Any

from rest_framework import serializers

from .models import Order, OrderItem, Product

MAX_ITEMS = 100
MAX_QUANTITY = 10_000


def id_field() -> serializers.CharField:
    return serializers.CharField(max_length=64, allow_blank=False, trim_whitespace=True)


class EventSerializer(serializers.Serializer):
    """The envelope every event shares."""

    eventType = serializers.CharField()  # noqa: N815 (the wire format is camelCase)
    eventId = serializers.UUIDField()  # noqa: N815
    timestamp = serializers.DateTimeField()

    #: The ``eventType`` value this serializer accepts.
    event_type = ""

    def validate_eventType(self, value: str) -> str:  # noqa: N802
        if value != self.event_type:
            raise serializers.ValidationError(f"expected {self.event_type!r}")
        return value


class OrderLineSerializer(serializers.Serializer):
    productId = id_field()  # noqa: N815
    quantity = serializers.IntegerField(min_value=1, max_value=MAX_QUANTITY)


class PlaceOrderSerializer(EventSerializer):
    event_type = "PlaceOrder"
    orderId = id_field()  # noqa: N815
    customerId = id_field()  # noqa: N815
    items: serializers.ListSerializer[dict[str, Any]] = serializers.ListSerializer(
        child=OrderLineSerializer(), allow_empty=False, max_length=MAX_ITEMS
    )


class AcceptedSerializer(serializers.Serializer):
    eventId = serializers.UUIDField()  # noqa: N815
    status = serializers.CharField()


class OrderItemSerializer(serializers.ModelSerializer):
    productId = serializers.CharField(source="product.product_id")  # noqa: N815
    unitPrice = serializers.DecimalField(source="unit_price", max_digits=12, decimal_places=2)  # noqa: N815

    class Meta:
        model = OrderItem
        fields = ["productId", "quantity", "unitPrice"]


class OrderSerializer(serializers.ModelSerializer):
    orderId = serializers.CharField(source="order_id")  # noqa: N815
    customerId = serializers.CharField(source="requested_customer_id")  # noqa: N815
    originalEventId = serializers.UUIDField(source="original_event_id")  # noqa: N815
    createdAt = serializers.DateTimeField(source="created_at")  # noqa: N815
    items = OrderItemSerializer(many=True)

    class Meta:
        model = Order
        fields = [
            "orderId",
            "customerId",
            "status",
            "reason",
            "total",
            "originalEventId",
            "createdAt",
            "items",
        ]


class ProductSerializer(serializers.ModelSerializer):
    productId = serializers.CharField(source="product_id")  # noqa: N815

    class Meta:
        model = Product
        fields = ["productId", "name", "price", "stock"]
