"""What the app's admins share: the records are an audit trail, so they are read-only; times
are shown to the millisecond; each record links to the page of its event."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

from django.contrib import admin
from django.db import models
from django.http import HttpRequest
from django.urls import NoReverseMatch, reverse
from django.utils import timezone
from django.utils.html import format_html
from django.utils.translation import gettext as _

#: The URL name of the per-event page (idempotency.console), in the admin's namespace.
EVENT_URL_NAME = "idempotency_event"


class ReadOnlyAdmin(admin.ModelAdmin):
    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


# Times as an operator needs them: the admin's default format stops at the minute, and the
# steps of one event (stored, published, processed, a duplicate, a dead letter) often fall
# within the same second.


def precise(value: datetime | None) -> str:
    """``2026-12-01 13:05:48.123 UTC``; ``-`` for no time."""
    if value is None:
        return "-"
    if timezone.is_aware(value):
        value = timezone.localtime(value)
    text = value.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    zone = value.tzname() if value.tzinfo is not None else ""
    return f"{text} {zone}".strip()


if TYPE_CHECKING:
    _AdminBase = admin.options.BaseModelAdmin
else:
    _AdminBase = object


class PreciseTimes(_AdminBase):
    """Shows every ``DateTimeField`` of the model with seconds and milliseconds.

    Each such field named in ``list_display``, ``readonly_fields``, ``fields`` or ``fieldsets``
    is shown through a display function of the same name (sortable by the field), and left out
    of the form, so it is never shown twice. A mixin for a ``ModelAdmin`` and for an inline
    (``class PaymentInline(PreciseTimes, admin.TabularInline)``); :class:`PreciseTimesAdmin` is
    the ``ModelAdmin`` with it.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._precise: dict[str, Any] = {
            f.name: _display(f)
            for f in self.model._meta.fields
            if isinstance(f, models.DateTimeField)
        }

    def _swap(self, names: Any) -> list[Any]:
        return [self._precise.get(n, n) if isinstance(n, str) else n for n in names]

    def get_readonly_fields(self, request: Any, obj: Any = None) -> Any:
        return self._swap(super().get_readonly_fields(request, obj))

    def get_exclude(self, request: Any, obj: Any = None) -> Any:
        return [*(super().get_exclude(request, obj) or ()), *self._precise]

    def get_fieldsets(self, request: Any, obj: Any = None) -> Any:
        fieldsets = super().get_fieldsets(request, obj)
        return [
            (name, {**options, "fields": self._swap(options.get("fields", ()))})
            for name, options in fieldsets
        ]


class PreciseTimesAdmin(PreciseTimes, admin.ModelAdmin):
    """A ``ModelAdmin`` showing its times with seconds and milliseconds (:class:`PreciseTimes`),
    in its changelist too."""

    def get_list_display(self, request: Any) -> Any:
        return self._swap(super().get_list_display(request))


def _display(field: models.DateTimeField) -> Any:
    def show(obj: Any) -> str:
        return precise(getattr(obj, field.name))

    show.__name__ = field.name
    return admin.display(description=field.verbose_name, ordering=field.name)(show)


def event_url(event_id: Any) -> str:
    """The per-event page of *event_id*; ``""`` if it cannot be named in a URL."""
    text = "" if event_id is None else str(event_id)
    if not text:
        return ""
    try:
        return reverse(f"admin:{EVENT_URL_NAME}", kwargs={"event_id": text})
    except NoReverseMatch:
        return ""


def event_link(event_id: Any, text: str | None = None) -> str:
    """ "What happened to it", linking to the event's page; ``-`` without an event id."""
    url = event_url(event_id)
    if not url:
        return "-"
    label = text or _("what happened to it")
    return format_html('<a href="{}" class="idem-event-link">{}</a>', url, label)
