"""Wire format of the events (camelCase JSON) and of the read endpoints."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from rest_framework import serializers

from .models import Customer, LedgerEntry, Order, OrderItem, Payment, Product

MAX_ITEMS = 100
MAX_QUANTITY = 10_000
MAX_AMOUNT = Decimal("1000000.00")


def id_field() -> serializers.CharField:
    return serializers.CharField(max_length=64, allow_blank=False, trim_whitespace=True)


def amount_field() -> serializers.DecimalField:
    return serializers.DecimalField(
        max_digits=12, decimal_places=2, min_value=Decimal("0.01"), max_value=MAX_AMOUNT
    )


class UUIDStringField(serializers.UUIDField):
    """A UUID written as a JSON string; DRF's own field would also take an integer."""

    def to_internal_value(self, data: Any) -> Any:
        if not isinstance(data, str):
            self.fail("invalid", value=data)
        return super().to_internal_value(data)


class EventSerializer(serializers.Serializer):
    """The envelope every event shares."""

    eventType = serializers.CharField()  # noqa: N815 (the wire format is camelCase)
    eventId = UUIDStringField()  # noqa: N815
    timestamp = serializers.DateTimeField()

    #: The ``eventType`` value this serializer accepts.
    event_type = ""

    def validate_eventType(self, value: str) -> str:  # noqa: N802
        if value != self.event_type:
            raise serializers.ValidationError(f"expected {self.event_type!r}")
        return value

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        # Strict: a misspelt field ("paymentID") is an error, not silently dropped data.
        unknown = sorted(set(self.initial_data) - set(self.fields))
        if unknown:
            raise serializers.ValidationError({name: ["Unknown field."] for name in unknown})
        return attrs


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


class PaymentReceivedSerializer(EventSerializer):
    event_type = "PaymentReceived"
    orderId = id_field()  # noqa: N815
    paymentId = id_field()  # noqa: N815
    amount = amount_field()
    currency = serializers.RegexField(r"^[A-Z]{3}$", help_text="ISO 4217 code, e.g. USD")


class DebitAccountSerializer(EventSerializer):
    event_type = "DebitAccount"
    customerId = id_field()  # noqa: N815
    amount = amount_field()
    reason = serializers.CharField(max_length=200)


class OrderShippedSerializer(EventSerializer):
    event_type = "OrderShipped"
    orderId = id_field()  # noqa: N815
    trackingNumber = id_field()  # noqa: N815


class AcceptedSerializer(serializers.Serializer):
    eventId = serializers.UUIDField()  # noqa: N815
    status = serializers.CharField()


class OrderItemSerializer(serializers.ModelSerializer):
    productId = serializers.CharField(source="product.product_id")  # noqa: N815
    unitPrice = serializers.DecimalField(source="unit_price", max_digits=12, decimal_places=2)  # noqa: N815

    class Meta:
        model = OrderItem
        fields = ["productId", "quantity", "unitPrice"]


class PaymentSerializer(serializers.ModelSerializer):
    paymentId = serializers.CharField(source="payment_id")  # noqa: N815
    originalEventId = serializers.UUIDField(source="original_event_id")  # noqa: N815
    receivedAt = serializers.DateTimeField(source="received_at")  # noqa: N815

    class Meta:
        model = Payment
        fields = ["paymentId", "amount", "currency", "originalEventId", "receivedAt"]


class OrderSerializer(serializers.ModelSerializer):
    orderId = serializers.CharField(source="order_id")  # noqa: N815
    customerId = serializers.CharField(source="requested_customer_id")  # noqa: N815
    originalEventId = serializers.UUIDField(source="original_event_id")  # noqa: N815
    paidAmount = serializers.DecimalField(source="paid_amount", max_digits=12, decimal_places=2)  # noqa: N815
    trackingNumber = serializers.CharField(source="tracking_number")  # noqa: N815
    createdAt = serializers.DateTimeField(source="created_at")  # noqa: N815
    shippedAt = serializers.DateTimeField(source="shipped_at")  # noqa: N815
    items = OrderItemSerializer(many=True)
    payments = PaymentSerializer(many=True)

    class Meta:
        model = Order
        fields = [
            "orderId",
            "customerId",
            "status",
            "reason",
            "total",
            "paidAmount",
            "trackingNumber",
            "originalEventId",
            "createdAt",
            "shippedAt",
            "items",
            "payments",
        ]


class ProductSerializer(serializers.ModelSerializer):
    productId = serializers.CharField(source="product_id")  # noqa: N815

    class Meta:
        model = Product
        fields = ["productId", "name", "price", "stock"]


class LedgerEntrySerializer(serializers.ModelSerializer):
    originalEventId = serializers.UUIDField(source="original_event_id")  # noqa: N815
    balanceAfter = serializers.DecimalField(source="balance_after", max_digits=12, decimal_places=2)  # noqa: N815
    createdAt = serializers.DateTimeField(source="created_at")  # noqa: N815

    class Meta:
        model = LedgerEntry
        fields = ["amount", "reason", "balanceAfter", "originalEventId", "createdAt"]


class CustomerSerializer(serializers.ModelSerializer):
    customerId = serializers.CharField(source="customer_id")  # noqa: N815
    ledger = serializers.SerializerMethodField()

    class Meta:
        model = Customer
        fields = ["customerId", "name", "balance", "ledger"]

    def get_ledger(self, customer: Customer) -> list[dict[str, Any]]:
        """The 20 latest ledger entries."""
        entries = customer.ledger.all()[:20]
        return list(LedgerEntrySerializer(entries, many=True).data)


class ConsumerStatusSerializer(serializers.Serializer):
    consumer = serializers.CharField()
    status = serializers.ChoiceField(
        choices=["processed", "duplicate-discarded", "rejected", "mismatch"]
    )
    reason = serializers.CharField()
    processedAt = serializers.DateTimeField()  # noqa: N815
    duplicatesDiscarded = serializers.IntegerField()  # noqa: N815


class EventStatusSerializer(serializers.Serializer):
    eventId = serializers.CharField()  # noqa: N815
    status = serializers.ChoiceField(
        choices=["pending", "processed", "duplicate-discarded", "rejected", "mismatch"]
    )
    consumers = ConsumerStatusSerializer(many=True)
