from __future__ import annotations

from django.contrib import admin
from django.urls import reverse
from django.utils.html import format_html
from django.utils.http import urlencode
from django.utils.translation import gettext_lazy as _

from .models import Customer, Order, OrderItem, Product


@admin.register(Product)
class ProductAdmin(admin.ModelAdmin):
    list_display = ("product_id", "name", "price", "stock")
    search_fields = ("product_id", "name")


@admin.register(Customer)
class CustomerAdmin(admin.ModelAdmin):
    list_display = ("customer_id", "name", "balance")
    search_fields = ("customer_id", "name")


class OrderItemInline(admin.TabularInline):
    model = OrderItem
    extra = 0
    readonly_fields = ("product", "quantity", "unit_price")
    can_delete = False


@admin.register(Order)
class OrderAdmin(admin.ModelAdmin):
    list_display = ("order_id", "requested_customer_id", "status", "total", "created_at")
    list_filter = ("status", "created_at")
    search_fields = ("=order_id", "=original_event_id", "requested_customer_id")
    date_hierarchy = "created_at"
    readonly_fields = ("original_event_id", "processed_events", "created_at")
    inlines = [OrderItemInline]

    @admin.display(description=_("processed events"))
    def processed_events(self, obj: Order) -> str:
        url = reverse("admin:idempotency_processedevent_changelist")
        query = urlencode({"q": str(obj.original_event_id)})
        return format_html('<a href="{}?{}">{}</a>', url, query, _("inbox records of this event"))


@admin.register(OrderItem)
class OrderItemAdmin(admin.ModelAdmin):
    list_display = ("order", "product", "quantity", "unit_price")
    list_select_related = ("order", "product")
