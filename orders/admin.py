from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest
from django.utils.translation import gettext_lazy as _

from idempotency.admin_base import PreciseTimes, PreciseTimesAdmin, event_link

from .models import (
    ConfirmationEmail,
    Customer,
    LedgerEntry,
    Order,
    OrderItem,
    Payment,
    Product,
    Rejection,
)


def processed_events_link(event_id: Any) -> str:
    """The event's page in the admin: its outbox row, inbox records, dead letters and key."""
    return event_link(event_id)


class EventDerivedAdmin(PreciseTimesAdmin):
    """Rows that only events create and change: shown, never added, edited or deleted here.

    An edit would contradict the inbox, which says the event's effect happened exactly once;
    a correction is another event. Times show seconds and milliseconds, as in the inbox.
    """

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        own = self._swap(f.name for f in self.model._meta.fields)
        return [*own, *(f for f in super().get_readonly_fields(request, obj) if f not in own)]

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Product)
class ProductAdmin(admin.ModelAdmin):
    list_display = ("product_id", "name", "price", "stock")
    search_fields = ("product_id", "name")


class LedgerEntryInline(PreciseTimes, admin.TabularInline):
    model = LedgerEntry
    extra = 0
    fields = ("created_at", "amount", "reason", "balance_after", "original_event_id")
    readonly_fields = fields
    can_delete = False
    show_change_link = True

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Customer)
class CustomerAdmin(admin.ModelAdmin):
    list_display = ("customer_id", "name", "email", "balance")
    search_fields = ("customer_id", "name", "email")
    # The balance moves only with DebitAccount events (its ledger says which).
    readonly_fields = ("balance",)
    inlines = [LedgerEntryInline]


class OrderItemInline(admin.TabularInline):
    model = OrderItem
    extra = 0
    readonly_fields = ("product", "quantity", "unit_price")
    can_delete = False

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class PaymentInline(PreciseTimes, admin.TabularInline):
    model = Payment
    extra = 0
    fields = ("payment_id", "amount", "currency", "received_at", "original_event_id")
    readonly_fields = fields
    can_delete = False

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Order)
class OrderAdmin(EventDerivedAdmin):
    list_display = (
        "order_id",
        "requested_customer_id",
        "status",
        "total",
        "paid_amount",
        "created_at",
    )
    list_filter = ("status", "created_at")
    search_fields = ("=order_id", "original_event_id__prefix", "requested_customer_id")
    date_hierarchy = "created_at"
    readonly_fields = ("original_event_id", "processed_events", "created_at", "shipped_at")
    inlines = [OrderItemInline, PaymentInline]

    @admin.display(description=_("event"))
    def processed_events(self, obj: Order) -> str:
        return processed_events_link(obj.original_event_id)


@admin.register(OrderItem)
class OrderItemAdmin(EventDerivedAdmin):
    list_display = ("order", "product", "quantity", "unit_price")
    list_select_related = ("order", "product")


@admin.register(Payment)
class PaymentAdmin(EventDerivedAdmin):
    list_display = ("payment_id", "order", "amount", "currency", "received_at")
    search_fields = ("=payment_id", "=order__order_id", "original_event_id__prefix")
    readonly_fields = ("original_event_id", "processed_events")
    list_select_related = ("order",)

    @admin.display(description=_("event"))
    def processed_events(self, obj: Payment) -> str:
        return processed_events_link(obj.original_event_id)


@admin.register(LedgerEntry)
class LedgerEntryAdmin(EventDerivedAdmin):
    list_display = ("customer", "amount", "reason", "balance_after", "created_at")
    search_fields = ("=customer__customer_id", "original_event_id__prefix")
    readonly_fields = ("original_event_id", "processed_events")
    list_select_related = ("customer",)

    @admin.display(description=_("event"))
    def processed_events(self, obj: LedgerEntry) -> str:
        return processed_events_link(obj.original_event_id)


@admin.register(Rejection)
class RejectionAdmin(EventDerivedAdmin):
    """Final rejections: an audit record that keeps a redelivery from being applied later."""

    list_display = ("original_event_id", "consumer", "reason", "created_at")
    list_filter = ("consumer", "created_at")
    search_fields = ("original_event_id__prefix", "reason")
    date_hierarchy = "created_at"
    readonly_fields = (
        "original_event_id",
        "processed_events",
        "consumer",
        "reason",
        "result",
        "created_at",
    )

    @admin.display(description=_("event"))
    def processed_events(self, obj: Rejection) -> str:
        return processed_events_link(obj.original_event_id)


@admin.register(ConfirmationEmail)
class ConfirmationEmailAdmin(EventDerivedAdmin):
    """Order confirmations the SMTP server accepted (a record, never edited)."""

    list_display = ("order", "recipient", "message_id", "sent_at")
    search_fields = ("=order__order_id", "recipient", "=message_id", "original_event_id__prefix")
    date_hierarchy = "sent_at"
    readonly_fields = (
        "original_event_id",
        "processed_events",
        "order",
        "recipient",
        "message_id",
        "sent_at",
    )
    list_select_related = ("order",)

    @admin.display(description=_("event"))
    def processed_events(self, obj: ConfirmationEmail) -> str:
        return processed_events_link(obj.original_event_id)
