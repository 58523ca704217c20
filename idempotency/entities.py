"""Entity-embedded keys: the business row carries the id of the event that created it.

A unique ``original_event_id`` is a guard that never expires: purging the inbox cannot let a
second order through, because the order itself remembers the event.
"""

from __future__ import annotations

import uuid
from typing import Any, TypeVar

from django.db import connections, models, router
from django.utils.translation import gettext_lazy as _

from .exceptions import TransactionRequired
from .fields import UUIDPrefix

M = TypeVar("M", bound=models.Model)


class EventIdField(models.UUIDField):
    """A unique, indexed, non-editable UUID naming the event that created the row."""

    description = _("Event id (unique, set once)")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("unique", True)
        kwargs.setdefault("editable", False)
        kwargs.setdefault("verbose_name", _("original event id"))
        super().__init__(*args, **kwargs)

    def deconstruct(self) -> Any:
        name, path, args, kwargs = super().deconstruct()
        if kwargs.get("unique") is True:
            del kwargs["unique"]
        if kwargs.get("editable") is False:
            del kwargs["editable"]
        return name, path, args, kwargs


EventIdField.register_lookup(UUIDPrefix)  # original_event_id__prefix="e0e0"


class EventKeyedModel(models.Model):
    """Abstract base for business rows created by an event."""

    original_event_id = EventIdField()

    class Meta:
        abstract = True


def create_once(
    model: type[M],
    original_event_id: Any,
    defaults: dict[str, Any] | None = None,
    *,
    field: str = "original_event_id",
) -> tuple[M, bool]:
    """``get_or_create`` the row created by *original_event_id*, inside the caller's transaction.

    Returns ``(row, created)``. A concurrent creator of the same row makes this one wait on the
    unique index, then return the winner's row with ``created=False``.
    """
    using = router.db_for_write(model) or "default"
    if not connections[using].in_atomic_block:
        raise TransactionRequired(
            f"create_once({model.__name__}) must run inside transaction.atomic(using={using!r})"
        )
    manager = model._default_manager.using(using)
    return manager.get_or_create(**{field: original_event_id}, defaults=defaults or {})


def event_keyed_models() -> list[type[models.Model]]:
    """Every installed model with an :class:`EventIdField`."""
    from django.apps import apps

    return [
        model
        for model in apps.get_models()
        if any(isinstance(f, EventIdField) for f in model._meta.get_fields())
    ]


def rows_for_event(event_id: str) -> list[models.Model]:
    """The business rows created by *event_id*, across every event-keyed model."""
    try:
        key = uuid.UUID(str(event_id))
    except ValueError:
        return []  # a composite or custom key names no entity
    rows: list[models.Model] = []
    for model in event_keyed_models():
        for field in model._meta.get_fields():
            if isinstance(field, EventIdField):
                rows.extend(model._default_manager.filter(**{field.name: key})[:10])
    return rows
