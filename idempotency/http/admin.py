"""Read-only admin of the HTTP ``Idempotency-Key`` records."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote, urlsplit

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

    #: ``key -> event id or ""``: which event the key's response names; :func:`event_of_key`
    #: (below) here, the console's once ``idempotency.admin`` has loaded.
    event_of: Any = staticmethod(lambda key: event_of_key(key))

    @admin.display(description=_("event"))
    def event(self, obj: IdempotencyKey) -> str:
        event_id = self.event_of(obj)
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


#: The stored response headers that say where a keyed request's work continues: a request that
#: hands its work to an event answers with a URL naming the event (a 201 or 202). The key keeps
#: no other link to the event.
LINK_HEADERS = ("Location", "Content-Location")

#: A UUID, the ids the example's requests hand their events.
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.I)


def linked_segments(key: IdempotencyKey) -> list[str]:
    """The percent-decoded segments of the paths the key's stored ``Location`` and
    ``Content-Location`` name, in that order, each header's last segment first."""
    headers = key.response_headers if isinstance(key.response_headers, dict) else {}
    found: list[str] = []
    for name in LINK_HEADERS:
        value = headers.get(name)
        if not isinstance(value, str):
            continue
        try:
            path = urlsplit(value).path
        except ValueError:
            continue  # not a URL
        found.extend(reversed([unquote(segment) for segment in path.split("/") if segment]))
    return found


def event_of_key(key: IdempotencyKey) -> str:
    """The event id the key's stored response names, as written, or ``""``: the first segment
    of :func:`linked_segments` that is a UUID.

    The admin's face gives :class:`IdempotencyKeyAdmin` the console's
    :func:`idempotency.console.story.event_of_key` instead, which also recognises an id of
    another shape that a record of the event holds.
    """
    return next((segment for segment in linked_segments(key) if UUID.fullmatch(segment)), "")
