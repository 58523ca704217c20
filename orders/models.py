from __future__ import annotations

from decimal import Decimal

from django.core.validators import MinValueValidator
from django.db import models
from django.db.models.functions import Now
from django.utils.translation import gettext_lazy as _

from idempotency.entities import EventKeyedModel
from idempotency.fields import ExactCharField


class Product(models.Model):
    product_id = ExactCharField(_("product id"), max_length=64, unique=True)
    name = models.CharField(_("name"), max_length=200)
    price = models.DecimalField(
        _("price"), max_digits=12, decimal_places=2, validators=[MinValueValidator(Decimal(0))]
    )
    stock = models.PositiveIntegerField(_("stock"), default=0)

    class Meta:
        ordering = ["product_id"]
        constraints = [
            # The database refuses negative stock even if application code gets it wrong.
            models.CheckConstraint(condition=models.Q(stock__gte=0), name="product_stock_gte_0"),
        ]

    def __str__(self) -> str:
        return self.product_id


class Customer(models.Model):
    customer_id = ExactCharField(_("customer id"), max_length=64, unique=True)
    name = models.CharField(_("name"), max_length=200, blank=True)
    #: Where an accepted order's confirmation goes; none is sent without one.
    email = models.EmailField(_("email"), blank=True)
    balance = models.DecimalField(
        _("balance"), max_digits=12, decimal_places=2, default=Decimal("0.00")
    )

    class Meta:
        ordering = ["customer_id"]
        constraints = [
            # A debit that would overdraw the account is refused by the database too.
            models.CheckConstraint(
                condition=models.Q(balance__gte=0), name="customer_balance_gte_0"
            ),
        ]

    def __str__(self) -> str:
        return self.customer_id


class Order(EventKeyedModel):
    """An order; ``original_event_id`` (unique) names the PlaceOrder event that created it."""

    class Status(models.TextChoices):
        ACCEPTED = "accepted", _("accepted")
        REJECTED = "rejected", _("rejected")
        PAID = "paid", _("paid")
        SHIPPED = "shipped", _("shipped")

    #: The currency of every price, total and payment in the example.
    CURRENCY = "USD"

    order_id = ExactCharField(_("order id"), max_length=64, unique=True)
    customer = models.ForeignKey(
        Customer, on_delete=models.PROTECT, related_name="orders", null=True, blank=True
    )
    #: The customer id as the event named it, kept even when no such customer exists.
    requested_customer_id = models.CharField(_("requested customer id"), max_length=64)
    status = models.CharField(_("status"), max_length=16, choices=Status.choices)
    reason = models.TextField(_("rejection reason"), blank=True, default="")
    total = models.DecimalField(
        _("total"), max_digits=12, decimal_places=2, default=Decimal("0.00")
    )
    paid_amount = models.DecimalField(
        _("paid amount"), max_digits=12, decimal_places=2, default=Decimal("0.00")
    )
    tracking_number = models.CharField(_("tracking number"), max_length=64, blank=True)
    created_at = models.DateTimeField(_("created at"), auto_now_add=True)
    shipped_at = models.DateTimeField(_("shipped at"), null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        permissions = [("submit_event", _("Can submit events to the API"))]

    def __str__(self) -> str:
        return self.order_id


class OrderItem(models.Model):
    order = models.ForeignKey(Order, on_delete=models.CASCADE, related_name="items")
    product = models.ForeignKey(Product, on_delete=models.PROTECT, related_name="order_items")
    quantity = models.PositiveIntegerField(_("quantity"))
    unit_price = models.DecimalField(_("unit price"), max_digits=12, decimal_places=2)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["order", "product"], name="orderitem_unique_product"),
        ]

    def __str__(self) -> str:
        return f"{self.quantity} x {self.product_id}"


class Payment(EventKeyedModel):
    """A payment applied to an order: an increment guarded twice.

    The inbox guards the event id; the unique (order, payment id) pair guards the business key,
    catching a producer that re-sends the same payment under a new event id.
    """

    order = models.ForeignKey(Order, on_delete=models.PROTECT, related_name="payments")
    payment_id = ExactCharField(_("payment id"), max_length=64)
    amount = models.DecimalField(_("amount"), max_digits=12, decimal_places=2)
    currency = models.CharField(_("currency"), max_length=3)
    received_at = models.DateTimeField(_("received at"), auto_now_add=True)

    class Meta:
        ordering = ["received_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["order", "payment_id"], name="payment_unique_per_order"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.payment_id} ({self.amount} {self.currency})"


class LedgerEntry(EventKeyedModel):
    """One applied debit of a customer's balance, named by the event that caused it."""

    customer = models.ForeignKey(Customer, on_delete=models.PROTECT, related_name="ledger")
    amount = models.DecimalField(_("amount"), max_digits=12, decimal_places=2)
    reason = models.CharField(_("reason"), max_length=200)
    balance_after = models.DecimalField(_("balance after"), max_digits=12, decimal_places=2)
    created_at = models.DateTimeField(_("created at"), auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]
        verbose_name_plural = _("ledger entries")

    def __str__(self) -> str:
        return f"{self.customer_id} {self.amount}"


class Rejection(EventKeyedModel):
    """The final rejection of an event, kept as long as the business rows are.

    The inbox row that records a rejection is purged after its retention; this one is not, so a
    redelivery after the purge is rejected again, with the same reason, instead of being applied
    to whatever the data has become since (a debit after a top-up, a shipment after a payment).
    Each event type of the example has one consumer, so the event id alone is the key.
    """

    consumer = models.CharField(_("consumer"), max_length=200)
    reason = models.TextField(_("reason"))
    result = models.JSONField(_("result"), default=dict, blank=True)
    created_at = models.DateTimeField(_("created at"), auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.consumer}: {self.original_event_id}"


class ConfirmationEmail(EventKeyedModel):
    """An order confirmation, recorded once the SMTP server accepted it.

    ``original_event_id`` is the OrderPlaced event's id, which is derived from the PlaceOrder
    event's; ``message_id`` is the email's ``Message-ID``, derived from it too.
    """

    order = models.ForeignKey(Order, on_delete=models.PROTECT, related_name="confirmations")
    recipient = models.EmailField(_("recipient"))
    message_id = ExactCharField(_("Message-ID"), max_length=255, unique=True)
    sent_at = models.DateTimeField(_("sent at"), db_default=Now())

    class Meta:
        ordering = ["-sent_at"]

    def __str__(self) -> str:
        return f"{self.order_id} to {self.recipient}"
