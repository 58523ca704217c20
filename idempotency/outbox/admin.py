"""Admin of the outbox: read-only, with an explicit, logged re-drive of failed messages."""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils.html import format_html
from django.utils.translation import gettext_lazy as _
from django.utils.translation import ngettext

from ..admin_base import PreciseTimesAdmin, ReadOnlyAdmin, event_link
from .models import OutboxMessage


class OutboxStatusFilter(admin.SimpleListFilter):
    title = _("status")
    parameter_name = "status"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, Any]]:
        return [
            ("pending", _("pending")),
            ("published", _("published")),
            ("failed", _("failed (needs a re-drive)")),
            ("republished", _("republished (no outcome was seen)")),
            ("unchecked", _("published, outcome not seen yet")),
        ]

    def queryset(
        self, request: HttpRequest, queryset: QuerySet[OutboxMessage]
    ) -> QuerySet[OutboxMessage]:
        value = self.value()
        if value == "pending":
            return queryset.pending()  # type: ignore[attr-defined]
        if value == "published":
            return queryset.filter(published_at__isnull=False)
        if value == "failed":
            return queryset.failed()  # type: ignore[attr-defined]
        if value == "republished":
            return queryset.filter(republished__gt=0)
        if value == "unchecked":
            return queryset.unreconciled()  # type: ignore[attr-defined]
        return queryset


@admin.register(OutboxMessage)
class OutboxMessageAdmin(PreciseTimesAdmin, ReadOnlyAdmin):
    list_display = (
        "pk",
        "created_at",
        "task_name",
        "event_id",
        "status",
        "published_at",
        "attempts",
        "republished",
        "error",
        "event",
    )
    list_filter = (OutboxStatusFilter, "task_name", "failed_at")
    # Ranges of unique indexes only: see the inbox's admin.
    search_fields = ("event_id__prefix", "task_id__prefix")
    date_hierarchy = "created_at"
    readonly_fields = [
        *(f.name for f in OutboxMessage._meta.fields if f.name != "last_error"),
        "last_error_text",
        "event",
    ]
    exclude = ("last_error",)
    actions = ["redrive"]

    @admin.display(description=_("status"))
    def status(self, message: OutboxMessage) -> str:
        if message.published_at is not None:
            return str(_("published"))
        if message.failed_at is not None:
            return str(_("failed"))
        return str(_("pending"))

    @admin.display(description=_("event"))
    def event(self, message: OutboxMessage) -> str:
        return event_link(message.event_id)

    @admin.display(description=_("last error"))
    def last_error_text(self, message: OutboxMessage) -> str:
        # Preformatted: an error may carry a traceback, read by its indentation.
        if not message.last_error:
            return "-"
        return format_html('<pre class="idem-traceback">{}</pre>', message.last_error)

    @admin.display(description=_("last error"))
    def error(self, message: OutboxMessage) -> str:
        return (
            message.last_error if len(message.last_error) <= 120 else f"{message.last_error[:119]}…"
        )

    @admin.action(
        description=_("Re-drive selected failed messages (the relay publishes them again)"),
        permissions=["change_state"],
    )
    def redrive(self, request: HttpRequest, queryset: QuerySet[OutboxMessage]) -> None:
        failed = list(queryset.failed())  # type: ignore[attr-defined]
        done = OutboxMessage.objects.filter(pk__in=[m.pk for m in failed]).redrive()
        for message in failed:
            self.log_change(request, message, f"Re-driven after: {message.last_error[:500]}")
        if done:
            self.message_user(
                request,
                ngettext(
                    "Re-drove %d failed message; the relay publishes it next.",
                    "Re-drove %d failed messages; the relay publishes them next.",
                    done,
                )
                % done,
                messages.SUCCESS,
            )
        skipped = queryset.count() - len(failed)
        if skipped:
            self.message_user(
                request,
                _("%(n)d selected message(s) were not failed and were left as they are.")
                % {"n": skipped},
                messages.WARNING,
            )

    def has_change_state_permission(self, request: HttpRequest) -> bool:
        # Re-driving publishes messages: as strong as deleting the record of a failure.
        return self.has_delete_permission(request)

    def changelist_view(self, request: HttpRequest, extra_context: Any = None) -> Any:
        pending = OutboxMessage.objects.pending()
        oldest = pending.order_by("pk").values_list("created_at", flat=True).first()
        failed = OutboxMessage.objects.failed().count()
        extra_context = {
            **(extra_context or {}),
            "title": _("Outbox: %(n)d pending%(since)s, %(failed)d failed")
            % {
                "n": pending.count(),
                "since": f" (oldest {oldest:%Y-%m-%d %H:%M:%S})" if oldest else "",
                "failed": failed,
            },
        }
        return super().changelist_view(request, extra_context)
