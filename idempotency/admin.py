from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.urls import NoReverseMatch, reverse
from django.utils.html import format_html_join
from django.utils.safestring import mark_safe
from django.utils.translation import gettext_lazy as _
from django.utils.translation import ngettext

from .entities import rows_for_event
from .models import ProcessedEvent


class MismatchFilter(admin.SimpleListFilter):
    title = _("payload mismatch")
    parameter_name = "mismatch"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, Any]]:
        return [("yes", _("Yes")), ("no", _("No"))]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        if self.value() == "yes":
            return queryset.exclude(mismatch_fingerprint="")
        if self.value() == "no":
            return queryset.filter(mismatch_fingerprint="")
        return queryset


@admin.register(ProcessedEvent)
class ProcessedEventAdmin(admin.ModelAdmin):
    """An audit log: nothing is added or edited here; forgetting a record is explicit and logged."""

    list_display = ("event_id", "consumer", "outcome", "processed_at", "has_mismatch")
    list_filter = ("consumer", "outcome", MismatchFilter, "processed_at")
    search_fields = ("=event_id", "consumer")
    date_hierarchy = "processed_at"
    ordering = ("-processed_at",)
    readonly_fields = [*(f.name for f in ProcessedEvent._meta.fields), "business_entities"]
    actions = ["forget"]
    show_full_result_count = False

    @admin.display(boolean=True, description=_("mismatch"))
    def has_mismatch(self, obj: ProcessedEvent) -> bool:
        return obj.has_mismatch

    @admin.display(description=_("business entities"))
    def business_entities(self, obj: ProcessedEvent) -> str:
        links = []
        for row in rows_for_event(obj.event_id):
            meta = row._meta
            try:
                url = reverse(f"admin:{meta.app_label}_{meta.model_name}_change", args=[row.pk])
            except NoReverseMatch:
                url = ""
            links.append((url, f"{meta.verbose_name}: {row}"))
        if not links:
            return "-"
        return format_html_join(mark_safe("<br>"), '<a href="{}">{}</a>', links)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.action(
        description=_("Forget selected events (a redelivery will process them again)"),
        permissions=["delete"],
    )
    def forget(self, request: HttpRequest, queryset: QuerySet[ProcessedEvent]) -> None:
        self.log_deletions(request, queryset)
        count, _ = queryset.delete()
        self.message_user(
            request,
            ngettext("Forgot %d event.", "Forgot %d events.", count) % count,
            messages.SUCCESS,
        )
