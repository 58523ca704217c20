"""Counters: the signals for each outcome and for purges, and their Prometheus export."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from django.apps import apps
from django.db import connection
from django.test import override_settings
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from prometheus_client import REGISTRY

from idempotency import metrics, signals
from idempotency.exceptions import PayloadMismatch
from idempotency.inbox import idempotent, reject
from idempotency.models import ProcessedEvent
from tests.factories import ProcessedEventFactory

pytestmark = pytest.mark.django_db


class Boom(Exception):
    pass


@pytest.fixture
def rejected() -> Iterator[list[dict[str, Any]]]:
    calls: list[dict[str, Any]] = []

    def receiver(**kwargs: Any) -> None:
        calls.append(kwargs)

    signals.event_rejected.connect(receiver)
    yield calls
    signals.event_rejected.disconnect(receiver)


def test_a_rejection_is_signalled_with_its_reason(rejected: list[dict[str, Any]]) -> None:
    with idempotent("orders", "e-1"):
        reject("insufficient stock")
    (call,) = rejected
    assert (call["consumer"], call["event_id"], call["reason"]) == (
        "orders",
        "e-1",
        "insufficient stock",
    )
    assert call["record"] == ProcessedEvent.objects.get()


def test_no_rejection_signal_for_a_processed_event_or_a_duplicate(
    rejected: list[dict[str, Any]],
) -> None:
    with idempotent("orders", "e-1"):
        pass
    with idempotent("orders", "e-2"):
        reject("no")
    with idempotent("orders", "e-2"):
        pass  # a duplicate of a rejected event
    assert [c["event_id"] for c in rejected] == ["e-2"]


def test_the_rejection_signal_costs_no_query(rejected: list[dict[str, Any]]) -> None:
    # A rejection writes what a stored result writes: the claim, then one UPDATE of the record.
    with CaptureQueriesContext(connection) as with_result, idempotent("orders", "e-1") as claim:
        claim.result = {"ok": True}
    with CaptureQueriesContext(connection) as with_rejection, idempotent("orders", "e-2"):
        reject("no")
    assert len(rejected) == 1
    assert len(with_rejection.captured_queries) == len(with_result.captured_queries)


# --- Prometheus ----------------------------------------------------------------------------------


@pytest.fixture
def exported() -> Iterator[None]:
    metrics.connect()
    yield
    metrics.disconnect()


def sample(name: str, consumer: str | None = None) -> float:
    labels = {} if consumer is None else {"consumer": consumer}
    return REGISTRY.get_sample_value(name, labels) or 0.0


class Delta:
    """The change of each counter since the block began."""

    NAMES = (
        "idempotency_events_processed_total",
        "idempotency_events_rejected_total",
        "idempotency_duplicates_discarded_total",
        "idempotency_payload_mismatches_total",
    )

    def __init__(self, consumer: str) -> None:
        self.consumer = consumer
        self.start = self.read()

    def read(self) -> dict[str, float]:
        values = {name: sample(name, self.consumer) for name in self.NAMES}
        values["idempotency_records_purged_total"] = sample("idempotency_records_purged_total")
        return values

    def __call__(self) -> dict[str, float]:
        now = self.read()
        return {name: now[name] - self.start[name] for name in now if now[name] != self.start[name]}


def test_each_outcome_is_counted_when_its_transaction_commits(
    exported: None, django_capture_on_commit_callbacks: Any
) -> None:
    delta = Delta("metrics.a")
    with django_capture_on_commit_callbacks(execute=True):
        with idempotent("metrics.a", "e-1", payload={"n": 1}):
            pass
        assert delta() == {}  # not before the commit
    with django_capture_on_commit_callbacks(execute=True):
        with idempotent("metrics.a", "e-1", payload={"n": 1}):
            pass
        with idempotent("metrics.a", "e-2"):
            reject("no")
        with pytest.raises(PayloadMismatch), idempotent("metrics.a", "e-1", payload={"n": 2}):
            pass
    assert delta() == {
        "idempotency_events_processed_total": 2,
        "idempotency_events_rejected_total": 1,
        "idempotency_duplicates_discarded_total": 1,
        "idempotency_payload_mismatches_total": 1,
    }


def test_a_rolled_back_claim_is_not_counted(
    exported: None, django_capture_on_commit_callbacks: Any
) -> None:
    delta = Delta("metrics.b")
    with (
        django_capture_on_commit_callbacks(execute=True),
        pytest.raises(Boom),
        idempotent("metrics.b", "e-1"),
    ):
        raise Boom
    assert delta() == {}


def test_purged_records_are_counted(
    exported: None, django_capture_on_commit_callbacks: Any
) -> None:
    delta = Delta("")
    for _ in range(3):
        ProcessedEventFactory(processed_at=timezone.now() - timedelta(days=40))
    with django_capture_on_commit_callbacks(execute=True):
        assert ProcessedEvent.objects.purge(batch_size=2) == 3
    assert delta() == {"idempotency_records_purged_total": 3}


def test_nothing_is_counted_once_disconnected(django_capture_on_commit_callbacks: Any) -> None:
    delta = Delta("metrics.c")
    with django_capture_on_commit_callbacks(execute=True), idempotent("metrics.c", "e-1"):
        pass
    assert delta() == {}


def test_the_metric_names() -> None:
    names = {name for _signal, name, *_ in metrics.METRICS}
    assert set(metrics.counters()) == names
    exposed = {m.name for m in REGISTRY.collect()}
    assert names <= exposed  # prometheus-client adds the _total suffix to the samples


def test_connected_only_when_enabled_and_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    assert metrics.connect_if_enabled() is False
    with override_settings(IDEMPOTENCY={"PROMETHEUS_METRICS": True}):
        monkeypatch.setattr(metrics, "prometheus_available", lambda: False)
        assert metrics.connect_if_enabled() is False
        monkeypatch.undo()
        try:
            assert metrics.connect_if_enabled() is True
            assert signals.event_processed.has_listeners(ProcessedEvent)
        finally:
            metrics.disconnect()
    with override_settings(IDEMPOTENCY={"NOT_A_KEY": 1}):
        assert metrics.connect_if_enabled() is False  # left to the system checks


def test_the_app_connects_them_when_ready() -> None:
    config = apps.get_app_config("idempotency")
    with override_settings(IDEMPOTENCY={"PROMETHEUS_METRICS": True}):
        try:
            config.ready()
            assert metrics._receivers
        finally:
            metrics.disconnect()
    config.ready()
    assert not metrics._receivers
