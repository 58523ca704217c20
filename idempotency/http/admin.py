"""Read-only admin of the HTTP ``Idempotency-Key`` records."""

from __future__ import annotations

import re
from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils.translation import gettext_lazy as _
from django.utils.translation import ngettext

from ..admin_base import PreciseTimesAdmin, event_link
from .models import IdempotencyKey

#: How much of a stored response body the detail page shows.
BODY_PREVIEW = 2000


@admin.register(IdempotencyKey)
class IdempotencyKeyAdmin(PreciseTimesAdmin):
    """An audit log of keys and the responses they replay; forgetting one is explicit and logged."""

    list_display = ("key", "owner", "endpoint", "state", "response_status", "created_at")
    list_filter = ("state", "endpoint", "response_status", "created_at")
    search_fields = ("=key", "=owner")
    date_hierarchy = "created_at"
    ordering = ("-created_at",)
    readonly_fields = [
        *(f.name for f in IdempotencyKey._meta.fields if f.name != "response_body"),
        "body",
        "event",
    ]
    exclude = ("response_body",)
    actions = ["forget"]
    show_full_result_count = False

    @admin.display(description=_("event"))
    def event(self, obj: IdempotencyKey) -> str:
        event_id = event_of_key(obj)
        return event_link(event_id, event_id) if event_id else "-"

    @admin.display(description=_("response body"))
    def body(self, obj: IdempotencyKey) -> str:
        text = bytes(obj.response_body).decode("utf-8", errors="replace")
        return text if len(text) <= BODY_PREVIEW else f"{text[:BODY_PREVIEW]}…"

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.action(
        description=_("Forget selected keys (a retry will run its request again)"),
        permissions=["delete"],
    )
    def forget(self, request: HttpRequest, queryset: QuerySet[IdempotencyKey]) -> None:
        self.log_deletions(request, queryset)
        count = queryset.delete()[0]
        self.message_user(
            request,
            ngettext("Forgot %d key.", "Forgot %d keys.", count) % count,
            messages.SUCCESS,
        )


#: A UUID inside a URL: how a keyed response that hands its work to an event names the event.
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.I)


def event_of_key(key: IdempotencyKey) -> str:
    """The event id the key's stored ``Location`` (or ``Content-Location``) names, or ``""``.

    The key keeps no other link to the event its request produced; the per-event page finds the
    key the same way, by the id inside that header.
    """
    headers = key.response_headers if isinstance(key.response_headers, dict) else {}
    for name in ("Location", "Content-Location"):
        found = _UUID.search(str(headers.get(name, "")))
        if found:
            return found.group(0).lower()
    return ""
