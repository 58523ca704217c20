from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.core.checks import Error, Warning
from django.test import override_settings

from idempotency.celery import idempotent_task
from idempotency.checks import check_celery_tasks, check_inbox_routing, check_settings


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
    assert {m.obj._meta.label for m in messages} == {
        "orders.Order",
        "orders.Payment",
        "orders.LedgerEntry",
    }
    assert check_inbox_routing() == []


def test_an_idempotent_task_without_acks_late_is_w003() -> None:
    messages = check_celery_tasks()
    flagged = [m.obj for m in messages if m.id == "idempotency.W003"]
    assert acks_early.name in flagged
    assert "orders.tasks.place_order" not in flagged
