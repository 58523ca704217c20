from __future__ import annotations

import io
from datetime import timedelta
from typing import Any

import pytest
from celery import Celery
from django.core.checks import Error, Warning
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.db import connection
from django.test import override_settings

from idempotency import checks, metrics
from idempotency.celery import idempotent_task
from idempotency.checks import (
    check_celery_tasks,
    check_guard_tables_together,
    check_inbox_routing,
    check_lifecycle_settings,
    check_retention_outlasts_redelivery,
    check_settings,
    check_unique_constraint,
)
from idempotency.entities import event_keyed_models
from idempotency.models import ProcessedEvent


@idempotent_task(acks_late=False)
def acks_early(event: dict[str, Any]) -> None:
    pass


def ids(messages: list[Any]) -> list[str]:
    return [m.id for m in messages]


def test_the_project_settings_are_clean() -> None:
    assert check_settings() == []


@override_settings(IDEMPOTENCY={"RETENTION": timedelta(days=1), "RETENTON": 1})
def test_unknown_key_is_e001() -> None:
    (message,) = check_settings()
    assert isinstance(message, Error)
    assert message.id == "idempotency.E001"
    assert "RETENTON" in message.msg


@override_settings(IDEMPOTENCY={"RETENTION": None})
def test_retention_none_is_w002() -> None:
    (message,) = check_settings()
    assert isinstance(message, Warning)
    assert message.id == "idempotency.W002"


@pytest.mark.parametrize("value", [timedelta(0), timedelta(days=-1), 30])
def test_a_non_positive_or_non_timedelta_retention_is_e003(value: object) -> None:
    with override_settings(IDEMPOTENCY={"RETENTION": value}):
        assert ids(check_settings()) == ["idempotency.E003"]


@override_settings(IDEMPOTENCY={"CONSUMER_RETENTION": {"orders.slow": timedelta(0)}})
def test_per_consumer_retention_is_checked() -> None:
    (message,) = check_settings()
    assert message.id == "idempotency.E003"
    assert "orders.slow" in message.msg


@override_settings(IDEMPOTENCY={"CONSUMER_RETENTION": [1]})
def test_consumer_retention_must_be_a_dict() -> None:
    assert ids(check_settings()) == ["idempotency.E002"]


@override_settings(IDEMPOTENCY={"ON_MISMATCH": "ignore"})
def test_unknown_mismatch_policy_is_e004() -> None:
    assert ids(check_settings()) == ["idempotency.E004"]


class SplitRouter:
    def db_for_write(self, model: type, **hints: Any) -> str | None:
        return "inbox" if model._meta.app_label == "idempotency" else None


def test_an_inbox_routed_away_from_the_entities_is_e005() -> None:
    with override_settings(DATABASE_ROUTERS=[SplitRouter()]):
        messages = check_inbox_routing()
    assert set(ids(messages)) == {"idempotency.E005"}
    flagged = {m.obj._meta.label for m in messages}
    assert flagged == {model._meta.label for model in event_keyed_models()}
    assert {"orders.Order", "orders.Payment", "orders.LedgerEntry"} <= flagged
    assert check_inbox_routing() == []


def test_an_inbox_routed_away_from_the_project_apps_is_w005() -> None:
    # 17.2: the idempotency app on a second database, the debit on the first; E005 only knows
    # the models with an EventIdField, W005 names every project app left behind.
    with override_settings(DATABASE_ROUTERS=[SplitRouter()]):
        messages = check_guard_tables_together()
    assert set(ids(messages)) == {"idempotency.W005"}
    apps_apart = {m.obj for m in messages}
    assert "orders" in apps_apart
    assert not {label for label in apps_apart if label in ("auth", "admin", "contenttypes")}
    orders = next(m for m in messages if m.obj == "orders")
    assert "'inbox'" in orders.msg
    assert "docs/databases.md" in (orders.hint or "")
    assert check_guard_tables_together() == []


class OutboxApartRouter:
    def db_for_write(self, model: type, **hints: Any) -> str | None:
        return "outbox" if model._meta.model_name == "outboxmessage" else None


def test_the_outbox_apart_from_the_inbox_is_e009() -> None:
    with override_settings(DATABASE_ROUTERS=[OutboxApartRouter()]):
        messages = check_guard_tables_together()
    assert ids(messages) == ["idempotency.E009"]
    assert "OutboxMessage" in messages[0].msg
    assert "'outbox'" in messages[0].msg


def test_manage_py_check_reports_a_split_inbox() -> None:
    out = io.StringIO()
    with (
        override_settings(DATABASE_ROUTERS=[SplitRouter()]),
        pytest.raises(SystemCheckError) as info,
    ):
        call_command("check", stdout=out, stderr=out)
    assert "idempotency.E005" in str(info.value)
    assert "idempotency.W005" in str(info.value)


def test_an_idempotent_task_without_acks_late_is_w003() -> None:
    messages = check_celery_tasks()
    flagged = [m.obj for m in messages if m.id == "idempotency.W003"]
    assert acks_early.name in flagged
    assert "orders.tasks.place_order" not in flagged


# --- Lifecycle checks: W001, E006, E007, E008, W004 --------------------------------------------


@pytest.fixture
def celery_app(monkeypatch: pytest.MonkeyPatch) -> Celery:
    """A Celery app of the test's own, seen by the checks instead of the project's."""
    # Celery lets this variable override conf.broker_url; CI sets it for the project.
    monkeypatch.delenv("CELERY_BROKER_URL", raising=False)
    app = Celery("checks", set_as_current=False)
    app.conf.broker_url = "memory://"
    monkeypatch.setattr(checks, "_celery_app", lambda: app)
    return app


def w001(**idempotency: Any) -> list[str]:
    with override_settings(IDEMPOTENCY=idempotency):
        messages = check_retention_outlasts_redelivery()
    assert {m.id for m in messages} <= {"idempotency.W001"}
    assert all(isinstance(m, Warning) for m in messages)
    return [m.msg for m in messages]


def test_the_project_outlasts_its_redelivery_horizon() -> None:
    assert check_retention_outlasts_redelivery() == []


def test_a_retention_shorter_than_the_visibility_timeout_is_w001(celery_app: Celery) -> None:
    celery_app.conf.broker_transport_options = {"visibility_timeout": 7200}
    (message,) = w001(RETENTION=timedelta(hours=1))
    assert "IDEMPOTENCY[RETENTION] (1 hour)" in message
    assert "broker_transport_options['visibility_timeout'] (2 hours)" in message
    assert w001(RETENTION=timedelta(hours=3)) == []


def test_redis_and_sqs_have_a_visibility_timeout_by_default(celery_app: Celery) -> None:
    celery_app.conf.broker_url = "redis://127.0.0.1:6379/0"
    (message,) = w001(RETENTION=timedelta(minutes=30))
    assert "the redis transport's default visibility_timeout (1 hour)" in message
    celery_app.conf.broker_url = "sqs://"
    assert checks.broker_horizon(celery_app) == checks.Horizon(
        timedelta(minutes=30), "the sqs transport's default visibility_timeout (30 minutes)"
    )
    celery_app.conf.broker_url = "amqp://guest@127.0.0.1//"
    assert checks.broker_horizon(celery_app) is None  # RabbitMQ redelivers at once


def test_a_retention_shorter_than_a_tasks_retries_is_w001(celery_app: Celery) -> None:
    @celery_app.task(
        shared=False, name="checks.slow", idempotent=True, max_retries=10, default_retry_delay=3600
    )
    def slow(event: Any) -> None:
        pass

    (message,) = w001(RETENTION=timedelta(hours=5))
    assert "task 'checks.slow': max_retries=10 x default_retry_delay=1 hour" in message
    assert w001(RETENTION=timedelta(hours=11)) == []


def test_a_consumers_own_retention_is_checked_against_its_task(celery_app: Celery) -> None:
    @celery_app.task(
        shared=False, name="checks.slow", idempotent=True, max_retries=10, default_retry_delay=3600
    )
    def slow(event: Any) -> None:
        pass

    (message,) = w001(CONSUMER_RETENTION={"checks.slow": timedelta(hours=5)})
    assert message.startswith("IDEMPOTENCY[CONSUMER_RETENTION['checks.slow']] (5 hours)")
    # The global retention no longer answers for that task.
    assert w001(RETENTION=timedelta(hours=5), CONSUMER_RETENTION={"checks.slow": None}) == []


def test_a_task_that_retries_forever_outlasts_any_retention(celery_app: Celery) -> None:
    @celery_app.task(shared=False, name="checks.forever", idempotent=True, max_retries=None)
    def forever(event: Any) -> None:
        pass

    (message,) = w001(RETENTION=timedelta(days=3650))
    assert "task 'checks.forever' retries without limit" in message


def test_tasks_that_are_not_idempotent_do_not_count(celery_app: Celery) -> None:
    @celery_app.task(shared=False, name="checks.plain", max_retries=None)
    def plain(event: Any) -> None:
        pass

    assert w001() == []


@pytest.mark.parametrize(
    ("options", "seconds", "source"),
    [
        ({"max_retries": 3, "default_retry_delay": 60}, 180, "max_retries=3 x "),
        (
            {"autoretry_for": (ValueError,), "retry_backoff": True, "retry_backoff_max": 10},
            1 + 2 + 4 + 8 + 10,
            "5 retries backing off up to retry_backoff_max=10 seconds",
        ),
        (
            {"autoretry_for": (ValueError,), "retry_backoff": 4, "max_retries": 3},
            4 + 8 + 16,
            "3 retries backing off",
        ),
        ({"retry_kwargs": {"max_retries": 2, "countdown": 30}}, 60, "max_retries=2 x "),
    ],
)
def test_retry_horizon(
    celery_app: Celery, options: dict[str, Any], seconds: int, source: str
) -> None:
    options = {"max_retries": 5, "default_retry_delay": 1, **options}

    @celery_app.task(shared=False, name="checks.retried", idempotent=True, **options)
    def retried(event: Any) -> None:
        pass

    horizon = checks.retry_horizon(celery_app, celery_app.tasks["checks.retried"])
    assert horizon.delay == timedelta(seconds=seconds)
    assert source in horizon.source
    assert horizon.consumer == "checks.retried"


def test_task_annotations_are_read(celery_app: Celery) -> None:
    celery_app.conf.task_annotations = {"checks.annotated": {"max_retries": 100}}

    @celery_app.task(shared=False, name="checks.annotated", idempotent=True, default_retry_delay=60)
    def annotated(event: Any) -> None:
        pass

    horizon = checks.retry_horizon(celery_app, celery_app.tasks["checks.annotated"])
    assert horizon.delay == timedelta(seconds=6000)


@pytest.mark.parametrize(
    ("duration", "written"),
    [
        (timedelta(days=30), "30 days"),
        (timedelta(days=1, hours=2), "1 day 2 hours"),
        (timedelta(hours=1, minutes=30), "1 hour 30 minutes"),
        (timedelta(minutes=1, seconds=5), "1 minute 5 seconds"),
        (timedelta(seconds=1), "1 second"),
        (timedelta(milliseconds=500), "0.5 seconds"),
        (timedelta(0), "0 seconds"),
        (timedelta(minutes=-5), "-5 minutes"),
        (900, "15 minutes"),
        (2.5, "2.5 seconds"),
    ],
)
def test_durations_are_written_as_people_write_them(duration: Any, written: str) -> None:
    # Not a timedelta's own "30 days, 0:00:00".
    assert checks._human(duration) == written


def test_the_configured_redelivery_horizon_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checks, "_celery_app", lambda: None)  # without Celery too
    (message,) = w001(REDELIVERY_HORIZON=timedelta(days=40))
    assert message.startswith(
        "IDEMPOTENCY[RETENTION] (30 days) is shorter than the redelivery horizon: "
        "IDEMPOTENCY['REDELIVERY_HORIZON'] (40 days)."
    )
    assert w001(REDELIVERY_HORIZON=timedelta(days=20)) == []
    assert w001() == []


def test_w001_leaves_none_and_invalid_retentions_to_other_checks(celery_app: Celery) -> None:
    celery_app.conf.broker_transport_options = {"visibility_timeout": 7200}
    assert w001(RETENTION=None) == []
    assert w001(RETENTION=timedelta(0)) == []
    with override_settings(IDEMPOTENCY={"RETENTON": 1}):
        assert check_retention_outlasts_redelivery() == []


@pytest.mark.parametrize("value", [0, -5, "100", True, 2.5])
def test_a_bad_purge_batch_size_is_e007(value: object) -> None:
    with override_settings(IDEMPOTENCY={"PURGE_BATCH_SIZE": value}):
        assert ids(check_lifecycle_settings()) == ["idempotency.E007"]


@pytest.mark.parametrize("value", ["40d", 40, timedelta(days=-1)])
def test_a_bad_redelivery_horizon_is_e008(value: object) -> None:
    with override_settings(IDEMPOTENCY={"REDELIVERY_HORIZON": value}):
        assert ids(check_lifecycle_settings()) == ["idempotency.E008"]


def test_prometheus_metrics_without_prometheus_client_is_w004(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with override_settings(IDEMPOTENCY={"PROMETHEUS_METRICS": True}):
        assert check_lifecycle_settings() == []
        monkeypatch.setattr(metrics, "prometheus_available", lambda: False)
        assert ids(check_lifecycle_settings()) == ["idempotency.W004"]


@pytest.mark.django_db
def test_the_unique_constraint_is_there() -> None:
    assert check_unique_constraint(databases=["default"]) == []
    assert check_unique_constraint() == []  # a database check: not run without --database


@pytest.mark.django_db
def test_a_table_without_its_unique_constraint_is_e006(monkeypatch: pytest.MonkeyPatch) -> None:
    table = ProcessedEvent._meta.db_table
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:  # rolled back with the test's transaction
            cursor.execute(
                f'ALTER TABLE "{table}" DROP CONSTRAINT "idempotency_unique_consumer_event"'
            )
    else:  # SQLite cannot drop a table constraint in place: hide it from the introspection
        introspection = connection.introspection
        real = introspection.get_constraints

        def without_unique(cursor: Any, name: str) -> dict[str, Any]:
            found = real(cursor, name)
            return {k: v for k, v in found.items() if not (v["unique"] and not v["primary_key"])}

        monkeypatch.setattr(introspection, "get_constraints", without_unique)
    (message,) = check_unique_constraint(databases=["default"])
    assert isinstance(message, Error)
    assert message.id == "idempotency.E006"
    assert "no unique constraint on (event_id, consumer)" in message.msg
    with pytest.raises(SystemCheckError, match=r"idempotency\.E006"):
        call_command("check", "--database", "default", stdout=io.StringIO())
    call_command("check", stdout=io.StringIO())  # without --database it does not run


@pytest.mark.django_db
def test_an_index_on_other_columns_does_not_count(monkeypatch: pytest.MonkeyPatch) -> None:
    introspection = connection.introspection

    def other_columns(cursor: Any, name: str) -> dict[str, Any]:
        return {"uniq": {"columns": ["event_id"], "unique": True, "primary_key": False}}

    monkeypatch.setattr(introspection, "get_constraints", other_columns)
    assert ids(check_unique_constraint(databases=["default"])) == ["idempotency.E006"]


def test_an_absurd_retry_count_is_unbounded(celery_app: Celery) -> None:
    @celery_app.task(shared=False, name="checks.absurd", idempotent=True, max_retries=10**12)
    def absurd(event: Any) -> None:
        pass

    assert checks.retry_horizon(celery_app, celery_app.tasks["checks.absurd"]).delay == (
        checks.UNBOUNDED
    )


# --- The outbox reconciler: E010, W006, W007 ----------------------------------------------------


def reconciler_checks(**idempotency: Any) -> list[Any]:
    from idempotency.checks import check_reconciler

    with override_settings(IDEMPOTENCY=idempotency):
        return check_reconciler()


def test_the_project_reconciler_settings_are_clean() -> None:
    from idempotency.checks import check_reconciler

    assert check_reconciler() == []


@pytest.mark.parametrize(
    "setting",
    [
        {"RECONCILE_AFTER": timedelta(0)},
        {"RECONCILE_AFTER": timedelta(seconds=-1)},
        {"RECONCILE_AFTER": 3600},
        {"RECONCILE_REPUBLISHES": -1},
        {"RECONCILE_REPUBLISHES": True},
        {"RECONCILE_REPUBLISHES": 10**30 * 1.0},
        {"RECONCILE_REPUBLISHES": "3"},
    ],
)
def test_bad_reconciler_settings_are_e010(setting: dict[str, Any]) -> None:
    messages = reconciler_checks(**setting)
    assert ids(messages) == ["idempotency.E010"]
    assert all(isinstance(m, Error) for m in messages)


def test_a_horizon_shorter_than_the_visibility_timeout_is_w006(celery_app: Celery) -> None:
    celery_app.conf.broker_url = "redis://127.0.0.1:6379/0"
    (message,) = reconciler_checks(RECONCILE_AFTER=timedelta(minutes=30))
    assert message.id == "idempotency.W006"
    assert "the redis transport's default visibility_timeout (1 hour)" in message.msg
    assert reconciler_checks(RECONCILE_AFTER=timedelta(hours=2)) == []
    assert reconciler_checks(RECONCILE_AFTER=None) == []  # off: nothing to contradict


def test_a_horizon_shorter_than_a_tasks_retries_is_w006(celery_app: Celery) -> None:
    @celery_app.task(
        shared=False, name="checks.slow", idempotent=True, max_retries=10, default_retry_delay=600
    )
    def slow(event: Any) -> None:
        pass

    (message,) = reconciler_checks(RECONCILE_AFTER=timedelta(hours=1))
    assert message.id == "idempotency.W006"
    assert "task 'checks.slow'" in message.msg


def test_a_window_past_the_retention_is_w007(celery_app: Celery) -> None:
    # Checks at 1, 2, 4 and 8 hours after each publish: the last 15 h after the first.
    (message,) = reconciler_checks(RETENTION=timedelta(hours=12))
    assert message.id == "idempotency.W007"
    assert "15 hours after a message's publish" in message.msg
    assert "IDEMPOTENCY[RETENTION] (12 hours)" in message.msg
    assert reconciler_checks(RETENTION=timedelta(hours=17)) == []
    (own,) = reconciler_checks(CONSUMER_RETENTION={"orders.quick": timedelta(hours=2)})
    assert "CONSUMER_RETENTION['orders.quick']" in own.msg


def test_republishing_past_the_declared_redelivery_horizon_is_w007(celery_app: Celery) -> None:
    (message,) = reconciler_checks(REDELIVERY_HORIZON=timedelta(hours=6))
    assert message.id == "idempotency.W007"
    assert "up to 7 hours after its first publish" in message.msg
    assert reconciler_checks(REDELIVERY_HORIZON=timedelta(hours=7)) == []
    assert reconciler_checks(REDELIVERY_HORIZON=timedelta(hours=1), RECONCILE_REPUBLISHES=0) == []
