"""Times as an operator needs them: to the millisecond, in the current time zone.

The admin's default format stops at the minute, and the steps of one event (stored, published,
processed, a duplicate, a dead letter) often fall within the same second.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.contrib import admin
from django.db import models
from django.utils import timezone


def precise(value: datetime | None) -> str:
    """``2026-12-01 13:05:48.123 UTC``; ``-`` for no time."""
    if value is None:
        return "-"
    if timezone.is_aware(value):
        value = timezone.localtime(value)
    text = value.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    zone = value.tzname() if value.tzinfo is not None else ""
    return f"{text} {zone}".strip()


class PreciseTimesAdmin(admin.ModelAdmin):
    """Shows every ``DateTimeField`` of the model with seconds and milliseconds.

    Each such field named in ``list_display``, ``readonly_fields`` or ``fieldsets`` is shown
    through a display function of the same name (sortable by the field), and left out of the
    form, so it is never shown twice.
    """

    def __init__(self, model: type[models.Model], admin_site: Any) -> None:
        super().__init__(model, admin_site)
        self._precise: dict[str, Any] = {
            f.name: _display(f) for f in model._meta.fields if isinstance(f, models.DateTimeField)
        }

    def _swap(self, names: Any) -> list[Any]:
        return [self._precise.get(n, n) if isinstance(n, str) else n for n in names]

    def get_list_display(self, request: Any) -> Any:
        return self._swap(super().get_list_display(request))

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


def _display(field: models.DateTimeField) -> Any:
    def show(obj: Any) -> str:
        return precise(getattr(obj, field.name))

    show.__name__ = field.name
    return admin.display(description=field.verbose_name, ordering=field.name)(show)
