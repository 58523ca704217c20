"""The inbox's system checks: its retentions and mismatch policy, its database and unique
constraint, the purge's settings, and the retention against the redelivery horizon.

Registered by :mod:`idempotency.checks`, which hands W001 the horizons Celery sets.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.core.checks import CheckMessage, Error, Warning

from ..conf import MISMATCH_POLICIES, app_settings
from ..exceptions import IdempotencyConfigurationError


def retention_settings() -> list[CheckMessage]:
    """E002, E003, W002 and E004, once the ``IDEMPOTENCY`` dict itself is valid (E001)."""
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


def check_inbox_routing(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """The inbox must live in the database the handlers write to, or nothing is atomic."""
    from django.db import router

    from ..entities import event_keyed_models
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


# --- Lifecycle: purge settings, redelivery horizon, the table's unique constraint -------------


def purge_settings() -> list[CheckMessage]:
    """E007 and E008: the purge's batch size and the declared redelivery horizon."""
    try:
        batch_size = app_settings.PURGE_BATCH_SIZE
        horizon = app_settings.REDELIVERY_HORIZON
    except IdempotencyConfigurationError:
        return []  # reported as E001
    messages: list[CheckMessage] = []
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        messages.append(
            Error(
                f"IDEMPOTENCY['PURGE_BATCH_SIZE'] must be a positive integer, not {batch_size!r}",
                id="idempotency.E007",
            )
        )
    if horizon is not None and (not isinstance(horizon, timedelta) or horizon < timedelta(0)):
        messages.append(
            Error(
                f"IDEMPOTENCY['REDELIVERY_HORIZON'] must be a timedelta or None, not {horizon!r}",
                id="idempotency.E008",
            )
        )
    return messages


@dataclass(frozen=True)
class Horizon:
    """How long after its first delivery an event may come back, and why."""

    delay: timedelta
    source: str
    #: The consumer (task name) it applies to; None: every consumer.
    consumer: str | None = None


def human_duration(duration: timedelta | float) -> str:
    """A duration as people write it: "30 days", "1 hour 30 minutes", "0.5 seconds" (a
    timedelta's own str gives "30 days, 0:00:00")."""
    if not isinstance(duration, timedelta):
        duration = timedelta(seconds=float(duration))
    if duration < timedelta(0):
        return f"-{human_duration(-duration)}"
    hours, rest = divmod(duration.seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    parts = [
        f"{count} {unit}{'' if count == 1 else 's'}"
        for count, unit in ((duration.days, "day"), (hours, "hour"), (minutes, "minute"))
        if count
    ]
    fraction = seconds + duration.microseconds / 1_000_000
    if fraction or not parts:
        parts.append(f"{fraction:g} second{'' if fraction == 1 else 's'}")
    return " ".join(parts)


def retention_outlasts_redelivery(
    horizons: Callable[[], Sequence[Horizon]],
) -> list[CheckMessage]:
    """W001: a record purged before its event's last redelivery lets that delivery through.

    *horizons* gives every redelivery horizon (the declared one, the broker's, each task's
    retries); it is called only once the settings it is weighed against are valid.
    """
    try:
        retention = app_settings.RETENTION
        overrides = app_settings.CONSUMER_RETENTION
        app_settings.REDELIVERY_HORIZON  # noqa: B018 (validated by E008)
    except IdempotencyConfigurationError:
        return []  # reported as E001
    overrides = overrides if isinstance(overrides, dict) else {}
    found = horizons()
    entries: list[tuple[str, Any, list[Horizon]]] = [
        (
            "RETENTION",
            retention,
            [h for h in found if h.consumer is None or h.consumer not in overrides],
        )
    ]
    for name, value in overrides.items():
        relevant = [h for h in found if h.consumer in (None, name)]
        entries.append((f"CONSUMER_RETENTION[{name!r}]", value, relevant))
    messages: list[CheckMessage] = []
    for label, value, relevant in entries:
        if not isinstance(value, timedelta) or value <= timedelta(0) or not relevant:
            continue  # None keeps records forever; a bad value is E003
        longest = max(relevant, key=lambda h: h.delay)
        if value < longest.delay:
            messages.append(
                Warning(
                    f"IDEMPOTENCY[{label}] ({human_duration(value)}) is shorter than the "
                    f"redelivery horizon: {longest.source}. A record purged before its event's "
                    "last redelivery lets that delivery be processed again.",
                    hint="Keep records longer than every redelivery: raise the retention, or "
                    "shorten the broker's visibility timeout or the task's retries.",
                    id="idempotency.W001",
                )
            )
    return messages


def check_unique_constraint(
    app_configs: Any = None, databases: Any = None, **kwargs: Any
) -> list[CheckMessage]:
    """Without the unique constraint, two concurrent claims of an event both succeed."""
    if not databases:
        return []  # a database check: run by migrate and by check --database
    from django.db import connections, router

    from .models import ProcessedEvent

    table = ProcessedEvent._meta.db_table
    wanted = {
        field.column
        for field in ProcessedEvent._meta.concrete_fields
        if field.name in ("event_id", "consumer")
    }
    messages: list[CheckMessage] = []
    for alias in databases:
        if not router.allow_migrate_model(alias, ProcessedEvent):
            continue
        connection = connections[alias]
        with connection.cursor() as cursor:
            if table not in connection.introspection.table_names(cursor):
                continue  # not migrated yet: the migration creates the constraint with it
            constraints = connection.introspection.get_constraints(cursor, table)
        if not any(c["unique"] and set(c["columns"]) == wanted for c in constraints.values()):
            messages.append(
                Error(
                    f"the table {table} in database {alias!r} has no unique constraint on "
                    "(event_id, consumer): concurrent deliveries of an event can both be "
                    "processed, and the claim's ON CONFLICT clause fails.",
                    hint="Restore idempotency_unique_consumer_event (see migration "
                    "idempotency 0001), after removing any duplicate rows.",
                    obj=ProcessedEvent,
                    id="idempotency.E006",
                )
            )
    return messages
