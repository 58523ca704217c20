"""The admin's "Events" entry: its list is the search of the per-event pages."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect

from .models import Event
from .views import may_view, search_url


@admin.register(Event)
class EventAdmin(admin.ModelAdmin):
    """Listed in the index for whoever may view one kind of record an event page shows."""

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        from ..models import DeadLetter, IdempotencyKey, OutboxMessage, ProcessedEvent

        models = (ProcessedEvent, OutboxMessage, DeadLetter, IdempotencyKey)
        return any(may_view(request, model) for model in models)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def changelist_view(self, request: HttpRequest, extra_context: Any = None) -> HttpResponse:
        if not self.has_view_permission(request):
            raise PermissionDenied
        return HttpResponseRedirect(search_url(str(request.GET.get("q", ""))))
