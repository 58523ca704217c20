"""System checks, namespaced ``idempotency.E00x`` / ``idempotency.W00x``. Ids are never reused.

In use: E001-E011, W001-W007.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.core.checks import CheckMessage, Error, Tags, Warning, register

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
    """An idempotent task that acks early loses the event if its worker dies mid-task."""
    app = _celery_app()
    if app is None:  # Celery is optional
        return []
    messages: list[CheckMessage] = []
    for name, task in sorted(app.tasks.items()):
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


# --- Lifecycle: purge settings, redelivery horizon, the table's unique constraint -------------


@register("idempotency")
def check_lifecycle_settings(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    try:
        batch_size = app_settings.PURGE_BATCH_SIZE
        horizon = app_settings.REDELIVERY_HORIZON
        prometheus = app_settings.PROMETHEUS_METRICS
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


@dataclass(frozen=True)
class Horizon:
    """How long after its first delivery an event may come back, and why."""

    delay: timedelta
    source: str
    #: The consumer (task name) it applies to; None: every consumer.
    consumer: str | None = None


#: Kombu's visibility timeouts when the broker options set none (seconds).
DEFAULT_VISIBILITY_TIMEOUTS = {"redis": 3600, "rediss": 3600, "sentinel": 3600, "sqs": 1800}

#: Stands for "retries without a limit": longer than any retention.
UNBOUNDED = timedelta.max


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


def broker_horizon(app: Any) -> Horizon | None:
    """Redis and SQS hand an unacknowledged message out again after the visibility timeout."""
    options = app.conf.broker_transport_options or {}
    if "visibility_timeout" in options:
        seconds = options["visibility_timeout"]
        where = "broker_transport_options['visibility_timeout']"
    else:
        scheme = str(app.conf.broker_url or "").partition("://")[0].partition("+")[0]
        if scheme not in DEFAULT_VISIBILITY_TIMEOUTS:
            return None  # RabbitMQ redelivers at once, when the consumer's channel closes
        seconds = DEFAULT_VISIBILITY_TIMEOUTS[scheme]
        where = f"the {scheme} transport's default visibility_timeout"
    return Horizon(timedelta(seconds=float(seconds)), f"{where} ({_human(seconds)})")


def retry_horizon(app: Any, task: Any) -> Horizon:
    """The longest a task's retries may be spread over: a retried copy of an event comes back
    after another copy was processed.

    It reads the task's attributes and Celery's ``task_annotations`` for it: ``max_retries``
    (``retry_kwargs['max_retries']``), ``default_retry_delay`` (``retry_kwargs['countdown']``)
    for retries the task asks for itself, and for ``autoretry_for`` retries with
    ``retry_backoff``, the sum of the exponential delays capped at ``retry_backoff_max``.
    """
    from celery.app.annotations import resolve_all

    names = (
        "max_retries",
        "default_retry_delay",
        "retry_kwargs",
        "retry_backoff",
        "retry_backoff_max",
        "autoretry_for",
    )
    attrs = {name: getattr(task, name, None) for name in names}
    annotations: Any = resolve_all(app.annotations, task)
    for annotation in annotations:
        attrs.update({k: v for k, v in annotation.items() if k in names})
    retry_kwargs = attrs["retry_kwargs"] or {}
    max_retries = retry_kwargs.get("max_retries", attrs["max_retries"])
    if max_retries is None:
        return Horizon(UNBOUNDED, f"task {task.name!r} retries without limit", task.name)
    delay = float(retry_kwargs.get("countdown", attrs["default_retry_delay"]) or 0)
    total = max_retries * delay
    source = f"max_retries={max_retries} x default_retry_delay={_human(delay)}"
    # @idempotent_task keeps its autoretry_for as retry_for (it retries them itself).
    if (attrs["autoretry_for"] or getattr(task, "retry_for", None)) and attrs["retry_backoff"]:
        factor = int(max(1.0, float(attrs["retry_backoff"])))
        cap = attrs["retry_backoff_max"] if attrs["retry_backoff_max"] is not None else 600
        backoff = 0
        for n in range(max_retries):
            if factor * 2**n >= cap:  # every later retry waits the cap
                backoff += cap * (max_retries - n)
                break
            backoff += factor * 2**n
        if backoff > total:
            total = backoff
            source = f"{max_retries} retries backing off up to retry_backoff_max={_human(cap)}"
    try:
        spread = timedelta(seconds=total)
    except OverflowError:
        spread = UNBOUNDED
    return Horizon(spread, f"task {task.name!r}: {source}", task.name)


def redelivery_horizons(app: Any) -> list[Horizon]:
    horizons: list[Horizon] = []
    configured = app_settings.REDELIVERY_HORIZON
    if isinstance(configured, timedelta):
        horizons.append(
            Horizon(configured, f"IDEMPOTENCY['REDELIVERY_HORIZON'] ({_human(configured)})")
        )
    if app is None:
        return horizons
    broker = broker_horizon(app)
    if broker is not None:
        horizons.append(broker)
    for _name, task in sorted(app.tasks.items()):
        if getattr(task, "idempotent", False) is True:
            horizons.append(retry_horizon(app, task))
    return horizons


@register("idempotency")
def check_retention_outlasts_redelivery(
    app_configs: Any = None, **kwargs: Any
) -> list[CheckMessage]:
    """A record purged before its event's last redelivery lets that delivery through."""
    try:
        retention = app_settings.RETENTION
        overrides = app_settings.CONSUMER_RETENTION
        app_settings.REDELIVERY_HORIZON  # noqa: B018 (validated by E008)
    except IdempotencyConfigurationError:
        return []  # reported as E001
    overrides = overrides if isinstance(overrides, dict) else {}
    horizons = redelivery_horizons(_celery_app())
    entries: list[tuple[str, Any, list[Horizon]]] = [
        (
            "RETENTION",
            retention,
            [h for h in horizons if h.consumer is None or h.consumer not in overrides],
        )
    ]
    for name, value in overrides.items():
        relevant = [h for h in horizons if h.consumer in (None, name)]
        entries.append((f"CONSUMER_RETENTION[{name!r}]", value, relevant))
    messages: list[CheckMessage] = []
    for label, value, relevant in entries:
        if not isinstance(value, timedelta) or value <= timedelta(0) or not relevant:
            continue  # None keeps records forever; a bad value is E003
        longest = max(relevant, key=lambda h: h.delay)
        if value < longest.delay:
            messages.append(
                Warning(
                    f"IDEMPOTENCY[{label}] ({_human(value)}) is shorter than the redelivery "
                    f"horizon: {longest.source}. A record purged before its event's last "
                    "redelivery lets that delivery be processed again.",
                    hint="Keep records longer than every redelivery: raise the retention, or "
                    "shorten the broker's visibility timeout or the task's retries.",
                    id="idempotency.W001",
                )
            )
    return messages


def _human(duration: timedelta | float) -> str:
    """A duration as people write it: "30 days", "1 hour 30 minutes", "0.5 seconds" (a
    timedelta's own str gives "30 days, 0:00:00")."""
    if not isinstance(duration, timedelta):
        duration = timedelta(seconds=float(duration))
    if duration < timedelta(0):
        return f"-{_human(-duration)}"
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


@register("idempotency", Tags.database)
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


# --- The outbox reconciler: E010, W006, W007 ----------------------------------------------------


@register("idempotency")
def check_reconciler(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """The reconciler's horizon against what may legitimately delay an outcome, and its whole
    window against how far back it may look (the retention) and the declared horizon."""
    from .outbox.reconciling import span

    try:
        after = app_settings.RECONCILE_AFTER
        republishes = app_settings.RECONCILE_REPUBLISHES
        retention = app_settings.RETENTION
        overrides = app_settings.CONSUMER_RETENTION
        declared = app_settings.REDELIVERY_HORIZON
    except IdempotencyConfigurationError:
        return []  # reported as E001
    messages: list[CheckMessage] = []
    if after is not None and (not isinstance(after, timedelta) or after <= timedelta(0)):
        messages.append(
            Error(
                f"IDEMPOTENCY['RECONCILE_AFTER'] must be a positive timedelta or None, "
                f"not {after!r}",
                id="idempotency.E010",
            )
        )
    if isinstance(republishes, bool) or not isinstance(republishes, int) or republishes < 0:
        messages.append(
            Error(
                f"IDEMPOTENCY['RECONCILE_REPUBLISHES'] must be an integer of 0 or more, "
                f"not {republishes!r}",
                id="idempotency.E010",
            )
        )
    if messages or after is None:
        return messages
    app = _celery_app()
    waits: list[Horizon] = []
    if app is not None:
        broker = broker_horizon(app)
        if broker is not None:
            waits.append(broker)
        waits.extend(
            retry_horizon(app, task)
            for _name, task in sorted(app.tasks.items())
            if getattr(task, "idempotent", False) is True
        )
    if waits:
        longest = max(waits, key=lambda h: h.delay)
        if after < longest.delay:
            messages.append(
                Warning(
                    f"IDEMPOTENCY['RECONCILE_AFTER'] ({_human(after)}) is shorter than "
                    f"{longest.source}: the outbox reconciler republishes messages that the "
                    "broker still holds or whose task is still retrying. Each is a duplicate "
                    "the inbox discards, but a retrying event then runs its retries twice, and "
                    "one still retrying after every republish is marked failed.",
                    hint="Raise RECONCILE_AFTER above the broker's visibility timeout and the "
                    "tasks' retry spans.",
                    id="idempotency.W006",
                )
            )
    window = span(after, republishes)
    limits = [("RETENTION", retention)]
    if isinstance(overrides, dict):
        limits += [(f"CONSUMER_RETENTION[{name!r}]", value) for name, value in overrides.items()]
    for label, value in limits:
        if isinstance(value, timedelta) and value > timedelta(0) and window + after > value:
            messages.append(
                Warning(
                    f"the outbox reconciler's last check comes {_human(window)} after a message's "
                    f"publish (RECONCILE_AFTER {_human(after)}, RECONCILE_REPUBLISHES "
                    f"{republishes}), past what IDEMPOTENCY[{label}] ({_human(value)}) lets it "
                    "look back: it never "
                    "looks at a message older than the retention less RECONCILE_AFTER (its "
                    "inbox record may be purged), so one that never gets an outcome is closed "
                    "unchecked instead of marked failed.",
                    hint="Shorten RECONCILE_AFTER or RECONCILE_REPUBLISHES, or keep records "
                    "longer.",
                    id="idempotency.W007",
                )
            )
    last_republish = span(after, republishes - 1) if republishes else None
    if isinstance(declared, timedelta) and last_republish and last_republish > declared:
        messages.append(
            Warning(
                f"the outbox reconciler republishes a message up to {_human(last_republish)} after "
                f"its first publish, later than IDEMPOTENCY['REDELIVERY_HORIZON'] "
                f"({_human(declared)}) "
                "says any producer publishes an event again.",
                hint="Raise REDELIVERY_HORIZON to cover it (and keep the retention above it), "
                "or shorten RECONCILE_AFTER or RECONCILE_REPUBLISHES.",
                id="idempotency.W007",
            )
        )
    return messages


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
