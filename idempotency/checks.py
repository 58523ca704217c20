"""System checks, namespaced ``idempotency.E00x`` / ``idempotency.W00x``. Ids are never reused."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.core.checks import CheckMessage, Error, Warning, register

from .conf import DEFAULTS, MISMATCH_POLICIES, app_settings
from .exceptions import IdempotencyConfigurationError


@register("idempotency")
def check_settings(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    try:
        app_settings.reload()
        app_settings.RETENTION  # noqa: B018 (loads and validates the dict)
    except IdempotencyConfigurationError as exc:
        return [
            Error(
                str(exc),
                hint=f"Accepted keys: {', '.join(sorted(DEFAULTS))}.",
                id="idempotency.E001",
            )
        ]
    messages: list[CheckMessage] = []
    retentions = {"RETENTION": app_settings.RETENTION}
    overrides = app_settings.CONSUMER_RETENTION
    if not isinstance(overrides, dict):
        messages.append(
            Error("IDEMPOTENCY['CONSUMER_RETENTION'] must be a dict", id="idempotency.E002")
        )
    else:
        retentions.update(
            {f"CONSUMER_RETENTION[{name!r}]": value for name, value in overrides.items()}
        )
    for label, value in retentions.items():
        if value is None:
            messages.append(
                Warning(
                    f"IDEMPOTENCY[{label}] is None: processed events are kept forever and the "
                    "table grows without bound.",
                    hint="Set a timedelta longer than the longest redelivery window.",
                    id="idempotency.W002",
                )
            )
        elif not isinstance(value, timedelta) or value <= timedelta(0):
            messages.append(
                Error(
                    f"IDEMPOTENCY[{label}] must be a positive timedelta, not {value!r}",
                    id="idempotency.E003",
                )
            )
    if app_settings.ON_MISMATCH not in MISMATCH_POLICIES:
        messages.append(
            Error(
                f"IDEMPOTENCY['ON_MISMATCH'] must be one of {', '.join(MISMATCH_POLICIES)}, "
                f"not {app_settings.ON_MISMATCH!r}",
                id="idempotency.E004",
            )
        )
    return messages


@register("idempotency", "database")
def check_inbox_routing(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """The inbox must live in the database the handlers write to, or nothing is atomic."""
    from django.db import router

    from .entities import event_keyed_models
    from .models import ProcessedEvent

    inbox_db = router.db_for_write(ProcessedEvent)
    messages: list[CheckMessage] = []
    for model in event_keyed_models():
        model_db = router.db_for_write(model)
        if model_db != inbox_db:
            messages.append(
                Error(
                    f"{model._meta.label} is written to database {model_db!r} but the "
                    f"ProcessedEvent inbox to {inbox_db!r}: the claim and the business change "
                    "cannot commit in one transaction.",
                    hint="Route idempotency.ProcessedEvent to the same database as the models "
                    "its handlers write.",
                    obj=model,
                    id="idempotency.E005",
                )
            )
    return messages


@register("idempotency")
def check_celery_tasks(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """An idempotent task that acks early loses the event if its worker dies mid-task."""
    try:
        from celery import current_app
    except ImportError:  # Celery is optional
        return []
    messages: list[CheckMessage] = []
    for name, task in sorted(current_app.tasks.items()):
        if getattr(task, "idempotent", False) is True and not task.acks_late:
            messages.append(
                Warning(
                    f"the idempotent task {name!r} is not acks_late: a worker killed mid-task "
                    "acknowledges the message and the event is lost.",
                    hint="Keep the acks_late=True default of @idempotent_task.",
                    obj=name,
                    id="idempotency.W003",
                )
            )
    return messages
