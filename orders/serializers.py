"""Wire format of the events (camelCase JSON) and of the read endpoints."""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any

from django.core.validators import MaxLengthValidator, MinLengthValidator, RegexValidator
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from .models import Customer, LedgerEntry, Order, OrderItem, Payment, Product

MAX_ITEMS = 100
MAX_QUANTITY = 10_000
MAX_AMOUNT = Decimal("1000000.00")


# The schema (/api/schema/) must allow exactly what these fields take: a value it allows is
# never refused, and one it forbids never accepted. So every field below takes only its own JSON
# type (REST framework's would turn 12 into "12", or "5" into 5), and the patterns it publishes
# are checked on the value as sent, nothing trimmed first.

#: An id (of an order, a product, a customer, a payment; a tracking number): 1 to 64 visible
#: ASCII characters, no spaces.
ID_PATTERN = r"^[!-~]{1,64}$"
#: Free text: no NUL character (PostgreSQL cannot store one).
TEXT_PATTERN = r"^[^\u0000]*$"


class StrictCharField(serializers.CharField):
    """A JSON string, never a number or a boolean turned into one."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("trim_whitespace", False)
        super().__init__(**kwargs)

    def to_internal_value(self, data: Any) -> Any:
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


@extend_schema_field({"type": "string", "pattern": ID_PATTERN, "minLength": 1, "maxLength": 64})
class IdField(StrictCharField):
    def to_internal_value(self, data: Any) -> Any:
        value = super().to_internal_value(data)
        if not re.fullmatch(ID_PATTERN, value):
            raise serializers.ValidationError(
                "An id is 1 to 64 visible ASCII characters, without spaces."
            )
        return value


class StrictIntegerField(serializers.IntegerField):
    """A JSON integer, never a string or a float that looks like one."""

    def to_internal_value(self, data: Any) -> Any:
        if not isinstance(data, int) or isinstance(data, bool):
            self.fail("invalid")
        return super().to_internal_value(data)


def id_field() -> serializers.CharField:
    return IdField(max_length=64)


def text_field(max_length: int) -> serializers.CharField:
    return StrictCharField(
        min_length=1, max_length=max_length, validators=[RegexValidator(TEXT_PATTERN)]
    )


#: An amount as the wire format writes it: a decimal string from 0.01 to 1000000.00 with at
#: most two decimals (leading zeros allowed). The schema publishes the same pattern, so a value
#: it allows is never refused, and the other way round.
AMOUNT_PATTERN = (
    r"^0*(?:[1-9][0-9]{0,5}(?:\.[0-9]{0,2})?|1000000(?:\.0{0,2})?|\.(?:0[1-9]|[1-9][0-9]?))$"
)


@extend_schema_field(
    {
        "type": "string",
        "format": "decimal",
        "pattern": AMOUNT_PATTERN,
        "example": "25.00",
        "description": "A decimal string, 0.01 to 1000000.00, at most two decimals.",
    }
)
class AmountField(serializers.DecimalField):
    """Money as a decimal string: a JSON number would be a binary float on many clients."""

    def to_internal_value(self, data: Any) -> Any:
        if not isinstance(data, str) or not re.fullmatch(AMOUNT_PATTERN, data):
            raise serializers.ValidationError(
                "An amount is a decimal string from 0.01 to 1000000.00 with at most two "
                'decimals, e.g. "25.00".'
            )
        return super().to_internal_value(data)


def amount_field() -> serializers.DecimalField:
    return AmountField(
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
    quantity = StrictIntegerField(min_value=1, max_value=MAX_QUANTITY)


def order_lines() -> serializers.ListSerializer[dict[str, Any]]:
    """One to MAX_ITEMS order lines."""
    return serializers.ListSerializer(
        child=OrderLineSerializer(),
        allow_empty=False,
        max_length=MAX_ITEMS,
        # Redundant with the two arguments above, which the schema generator does not read:
        # they publish minItems and maxItems.
        validators=[MinLengthValidator(1), MaxLengthValidator(MAX_ITEMS)],
    )


class PlaceOrderSerializer(EventSerializer):
    event_type = "PlaceOrder"
    orderId = id_field()  # noqa: N815
    customerId = id_field()  # noqa: N815
    items = order_lines()


class PaymentReceivedSerializer(EventSerializer):
    event_type = "PaymentReceived"
    orderId = id_field()  # noqa: N815
    paymentId = id_field()  # noqa: N815
    amount = amount_field()
    currency = StrictCharField(
        validators=[RegexValidator(r"\A[A-Z]{3}\Z")], help_text="ISO 4217 code, e.g. USD"
    )


class DebitAccountSerializer(EventSerializer):
    event_type = "DebitAccount"
    customerId = id_field()  # noqa: N815
    amount = amount_field()
    reason = text_field(200)


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
    shippedAt = serializers.DateTimeField(source="shipped_at", allow_null=True)  # noqa: N815
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


CONSUMER_STATUSES = ["processed", "duplicate-discarded", "rejected", "mismatch", "dead_lettered"]


class ConsumerStatusSerializer(serializers.Serializer):
    consumer = serializers.CharField()
    status = serializers.ChoiceField(choices=CONSUMER_STATUSES)
    reason = serializers.CharField(help_text="Why it was rejected or dead-lettered.")
    processedAt = serializers.DateTimeField(allow_null=True)  # noqa: N815
    deadLetteredAt = serializers.DateTimeField(allow_null=True)  # noqa: N815
    duplicatesDiscarded = serializers.IntegerField()  # noqa: N815


class EventStatusSerializer(serializers.Serializer):
    eventId = serializers.CharField()  # noqa: N815
    status = serializers.ChoiceField(choices=["pending", *CONSUMER_STATUSES])
    consumers = ConsumerStatusSerializer(many=True)
