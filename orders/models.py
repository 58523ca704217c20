from __future__ import annotations

from decimal import Decimal

from django.core.validators import MinValueValidator
from django.db import models
from django.utils.translation import gettext_lazy as _

from idempotency.entities import EventKeyedModel


class Product(models.Model):
    product_id = models.CharField(_("product id"), max_length=64, unique=True)
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
    customer_id = models.CharField(_("customer id"), max_length=64, unique=True)
    name = models.CharField(_("name"), max_length=200, blank=True)
    balance = models.DecimalField(
        _("balance"), max_digits=12, decimal_places=2, default=Decimal("0.00")
    )

    class Meta:
        ordering = ["customer_id"]

    def __str__(self) -> str:
        return self.customer_id


class Order(EventKeyedModel):
    """An order; ``original_event_id`` (unique) names the PlaceOrder event that created it."""

    class Status(models.TextChoices):
        ACCEPTED = "accepted", _("accepted")
        REJECTED = "rejected", _("rejected")

    order_id = models.CharField(_("order id"), max_length=64, unique=True)
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
    created_at = models.DateTimeField(_("created at"), auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]

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
