"""System checks, namespaced ``idempotency.E00x`` / ``idempotency.W00x``. Ids are never reused.

In use: E001-E011, W001-W007. Each check lives with what it checks; this module registers them
all (``IdempotencyConfig.ready()`` imports it) and holds what they share:

- here: the ``IDEMPOTENCY`` dict (E001), the guard tables on one database (E009, W005), the
  metrics (W004), the columns of an ``ExactCharField`` (E011), and the project's Celery app,
  whose task modules the checks import first;
- :mod:`idempotency.inbox.checks`: the retentions and the mismatch policy (E002, E003, E004,
  W002), the inbox's database (E005) and unique constraint (E006), the purge's settings (E007,
  E008), the retention against the redelivery horizon (W001);
- :mod:`idempotency.outbox.checks`: the reconciler (E010, W006, W007);
- :mod:`idempotency.celery.checks`: tasks that ack early (W003), and the horizons that a
  broker's visibility timeout and a task's retries set (imported only when Celery is).
"""

from __future__ import annotations

import weakref
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from django.core.checks import CheckMessage, Error, Tags, Warning, register

from .conf import DEFAULTS, app_settings
from .exceptions import IdempotencyConfigurationError
from .faces import lazy_names
from .inbox import checks as inbox_checks
from .inbox.checks import Horizon, check_inbox_routing, check_unique_constraint
from .inbox.checks import human_duration as _human
from .outbox import checks as outbox_checks

if TYPE_CHECKING:
    from .celery.checks import (
        DEFAULT_VISIBILITY_TIMEOUTS,
        UNBOUNDED,
        broker_horizon,
        retry_horizon,
    )

__all__ = [
    "DEFAULT_VISIBILITY_TIMEOUTS",
    "UNBOUNDED",
    "Horizon",
    "broker_horizon",
    "check_celery_tasks",
    "check_exact_columns",
    "check_guard_tables_together",
    "check_inbox_routing",
    "check_lifecycle_settings",
    "check_reconciler",
    "check_retention_outlasts_redelivery",
    "check_settings",
    "check_unique_constraint",
    "redelivery_horizons",
    "retry_horizon",
]

#: Celery's part, imported on first use: without Celery installed ``idempotency.celery`` does
#: not import, and the other checks must still load.
_CELERY = {
    name: "idempotency.celery.checks"
    for name in ("DEFAULT_VISIBILITY_TIMEOUTS", "UNBOUNDED", "broker_horizon", "retry_horizon")
}
__getattr__, __dir__ = lazy_names(__name__, _CELERY)


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
    return inbox_checks.retention_settings()


register("idempotency", Tags.database)(check_inbox_routing)


#: The app's tables that hold records guarding other writes, each with what it guards.
_GUARD_TABLES = {
    "ProcessedEvent": "the inbox",
    "IdempotencyKey": "the HTTP idempotency keys",
    "OutboxMessage": "the outbox",
}


@register("idempotency", "database")
def check_guard_tables_together(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """The inbox, the keys and the outbox must sit with the data they guard, so together.

    A handler that claims an event and enqueues a message, or a view that completes its key and
    writes its order, commits both in one transaction only on one database.
    """
    from django.apps import apps
    from django.db import router

    guards = {
        name: router.db_for_write(apps.get_model("idempotency", name)) for name in _GUARD_TABLES
    }
    inbox_db = guards["ProcessedEvent"]
    messages: list[CheckMessage] = []
    apart = {name: alias for name, alias in guards.items() if alias != inbox_db}
    if apart:
        where = ", ".join(
            f"{_GUARD_TABLES[name]} ({name}) to {alias!r}" for name, alias in apart.items()
        )
        messages.append(
            Error(
                f"the inbox (ProcessedEvent) is written to database {inbox_db!r} but {where}: "
                "a claim, a key or an outbox message and the business change it guards "
                "cannot commit in one transaction.",
                hint="Route every model of the idempotency app to the database of the data it "
                "guards (see docs/databases.md).",
                id="idempotency.E009",
            )
        )
    messages.extend(_apps_apart_from(inbox_db))
    return messages


def _apps_apart_from(inbox_db: str | None) -> list[CheckMessage]:
    """One warning per installed project app whose models are written to another database."""
    from django.apps import apps
    from django.db import router

    from .entities import event_keyed_models

    keyed = set(event_keyed_models())  # reported as E005
    messages: list[CheckMessage] = []
    for config in apps.get_app_configs():
        if config.name.startswith("django.contrib.") or config.label == "idempotency":
            continue
        apart = sorted(
            {
                str(router.db_for_write(model))
                for model in config.get_models()
                if model not in keyed and router.db_for_write(model) != inbox_db
            }
        )
        if apart:
            messages.append(
                Warning(
                    f"models of the app {config.label!r} are written to {', '.join(apart)} "
                    f"but the inbox (ProcessedEvent) to {inbox_db!r}: a handler that writes "
                    "them cannot commit its effect and its claim together, so a delivery that "
                    "fails after the write and is redelivered applies it twice.",
                    hint="The inbox must sit with the data it guards: route the app with the "
                    "idempotency app, or claim with using= the handler's database (see "
                    "docs/databases.md). Silence this check if no handler writes these models.",
                    obj=config.label,
                    id="idempotency.W005",
                )
            )
    return messages


@register("idempotency")
def check_celery_tasks(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """W003: an idempotent task that acks early loses the event if its worker dies mid-task."""
    app = _celery_app()
    if app is None:  # Celery is optional
        return []
    from .celery.checks import tasks_acking_late

    return tasks_acking_late(app)


@register("idempotency")
def check_lifecycle_settings(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """The purge's settings (E007, E008), then the metrics (W004)."""
    messages = inbox_checks.purge_settings()
    try:
        prometheus = app_settings.PROMETHEUS_METRICS
    except IdempotencyConfigurationError:
        return messages  # reported as E001
    if prometheus:
        from .metrics import prometheus_available

        if not prometheus_available():
            messages.append(
                Warning(
                    "IDEMPOTENCY['PROMETHEUS_METRICS'] is on but prometheus-client is not "
                    "installed: no metrics are exported.",
                    hint='pip install "django-idempotency[metrics]", or turn the setting off.',
                    id="idempotency.W004",
                )
            )
    return messages


def _celery_app() -> Any:
    """The project's Celery app with its tasks registered, or None without Celery (optional).

    ``autodiscover_tasks()`` is lazy: the apps' ``tasks`` modules are imported when a worker
    starts, so at check time no task would be registered and the per-task checks could never
    fire. Import them now, as the worker does (each module once; later calls cost nothing).
    """
    try:
        from celery import current_app
    except ImportError:
        return None
    app = getattr(current_app, "_get_current_object", lambda: current_app)()
    if app not in _discovered:
        # Celery's Django fix-up runs the system checks when the modules are imported: this
        # very function again, which must not import them a second time.
        _discovered.add(app)
        try:
            app.loader.import_default_modules()
        except BaseException:
            _discovered.discard(app)
            raise
    return app


#: The Celery apps whose task modules were imported for the checks.
_discovered: weakref.WeakSet[Any] = weakref.WeakSet()


def _celery_horizons(app: Any) -> list[Horizon]:
    if app is None:
        return []
    from .celery.checks import celery_horizons

    return celery_horizons(app)


def redelivery_horizons(app: Any) -> list[Horizon]:
    """Every horizon W001 weighs: the declared ``REDELIVERY_HORIZON``, then Celery's."""
    horizons: list[Horizon] = []
    configured = app_settings.REDELIVERY_HORIZON
    if isinstance(configured, timedelta):
        horizons.append(
            Horizon(configured, f"IDEMPOTENCY['REDELIVERY_HORIZON'] ({_human(configured)})")
        )
    return [*horizons, *_celery_horizons(app)]


@register("idempotency")
def check_retention_outlasts_redelivery(
    app_configs: Any = None, **kwargs: Any
) -> list[CheckMessage]:
    """W001: a record purged before its event's last redelivery lets that delivery through."""
    return inbox_checks.retention_outlasts_redelivery(lambda: redelivery_horizons(_celery_app()))


register("idempotency", Tags.database)(check_unique_constraint)


@register("idempotency")
def check_reconciler(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """E010, W006, W007: the outbox reconciler's settings against the broker's and the tasks'
    waits, the retention and the declared horizon."""
    return outbox_checks.reconciler_settings(lambda: _celery_horizons(_celery_app()))


# --- Columns that hold ids: E011 ------------------------------------------------------------

#: Pairs of values an exact column must tell apart: case, accents, trailing spaces.
_INEXACT_PAIRS = (("ABC", "abc"), ("e", "\u00e9"), ("abc", "abc "))


@register("idempotency", Tags.database)
def check_exact_columns(
    app_configs: Any = None, databases: Any = None, **kwargs: Any
) -> list[CheckMessage]:
    """On MariaDB/MySQL, a column of an ExactCharField whose collation equates distinct ids.

    Its unique index then takes event ``abc`` for a duplicate of ``ABC`` (or of ``"abc "``)
    and the second event is discarded unapplied. The migrations give these columns a binary
    collation; this catches a table created or altered outside them.
    """
    if not databases:
        return []  # a database check: run by migrate and by check --database
    from django.apps import apps
    from django.db import connections, router
    from django.db.migrations.loader import MigrationLoader

    from .fields import ExactCharField, exact_collation

    messages: list[CheckMessage] = []
    for alias in databases:
        connection = connections[alias]
        if not exact_collation(connection):
            continue
        fields = [
            (model, field)
            for model in apps.get_models()
            if router.allow_migrate_model(alias, model)
            for field in model._meta.local_concrete_fields
            if isinstance(field, ExactCharField) and not getattr(field, "db_collation", None)
        ]
        if not fields:
            continue
        loader = MigrationLoader(connection, ignore_no_migrations=True)
        # An app with a migration still to apply is left alone: migrate runs this check before
        # migrating, and the pending migration may be the one that sets the collation.
        pending = {
            app for app, _name in set(loader.disk_migrations) - set(loader.applied_migrations or ())
        }
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT table_name, column_name, character_set_name, collation_name "
                "FROM information_schema.columns WHERE table_schema = DATABASE()"
            )
            columns = {(table, column): (cs, co) for table, column, cs, co in cursor.fetchall()}
            for model, field in fields:
                found = columns.get((model._meta.db_table, field.column))
                if model._meta.app_label in pending or not found or not all(found):
                    continue
                charset, collation = found
                if _compares_exactly(cursor, charset, collation):
                    continue
                messages.append(
                    Error(
                        f"{model._meta.db_table}.{field.column} in database {alias!r} has the "
                        f"collation {collation}, which takes ids that differ in case, accents "
                        "or trailing spaces for one: its unique index discards the second "
                        "event as a duplicate of the first.",
                        hint=f"ALTER TABLE {model._meta.db_table} MODIFY {field.column} "
                        f"{field.db_type(connection)} COLLATE {exact_collation(connection)}"
                        f"{'' if field.null else ' NOT NULL'} (what the app's migrations do; "
                        "see docs/databases.md).",
                        obj=model,
                        id="idempotency.E011",
                    )
                )
    return messages


def _compares_exactly(cursor: Any, charset: str, collation: str) -> bool:
    if not (charset.replace("_", "").isalnum() and collation.replace("_", "").isalnum()):
        return False  # (names from information_schema; never interpolate anything else)
    tests = ", ".join(
        f"CONVERT(%s USING {charset}) COLLATE {collation} = CONVERT(%s USING {charset})"
        for _ in _INEXACT_PAIRS
    )
    cursor.execute(f"SELECT {tests}", [value for pair in _INEXACT_PAIRS for value in pair])
    return not any(cursor.fetchone())
