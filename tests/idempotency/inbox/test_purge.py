"""Retention and purge: the QuerySet's batched purge, the management command, the beat task."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection, transaction
from django.test import override_settings
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from idempotency import signals
from idempotency.management.commands import purge_processed_events as command
from idempotency.models import PURGE_TAIL_WINDOW, ProcessedEvent, retention_cutoffs
from idempotency.tasks import purge_processed_events
from orders.models import Order, Product
from orders.tasks import place_order
from tests.factories import ProcessedEventFactory, place_order_event
from tests.services import ROOT

pytestmark = pytest.mark.django_db

NOW = timezone.now()


def aged(days: float, consumer: str = "tests.consumer", **kwargs: Any) -> ProcessedEvent:
    """A record processed *days* before NOW."""
    record: ProcessedEvent = ProcessedEventFactory(
        consumer=consumer, processed_at=NOW - timedelta(days=days), **kwargs
    )
    return record


def left() -> list[tuple[str, int]]:
    """What the inbox still holds: (consumer, age in whole days), oldest first."""
    return [
        (consumer, (NOW - at).days)
        for consumer, at in ProcessedEvent.objects.order_by("processed_at").values_list(
            "consumer", "processed_at"
        )
    ]


@pytest.fixture
def received() -> Any:
    """The events_purged signals sent, as (count, using)."""
    calls: list[tuple[int, str]] = []

    def receiver(*, count: int, using: str, **kwargs: Any) -> None:
        calls.append((count, using))

    signals.events_purged.connect(receiver)
    yield calls
    signals.events_purged.disconnect(receiver)


# --- The QuerySet ------------------------------------------------------------------------------


def test_purge_deletes_only_what_is_past_the_retention() -> None:
    aged(45)
    aged(31)
    aged(29)
    aged(1)
    assert ProcessedEvent.objects.purge(now=NOW) == 2
    assert left() == [("tests.consumer", 29), ("tests.consumer", 1)]


@override_settings(
    IDEMPOTENCY={
        "RETENTION": timedelta(days=30),
        "CONSUMER_RETENTION": {"slow": timedelta(days=90), "forever": None},
    }
)
def test_each_consumer_keeps_its_own_retention() -> None:
    aged(100, "slow")
    aged(60, "slow")
    aged(1000, "forever")
    aged(31, "other")
    aged(20, "other")
    assert ProcessedEvent.objects.purge(now=NOW) == 2
    assert left() == [("forever", 1000), ("slow", 60), ("other", 20)]


@override_settings(
    IDEMPOTENCY={"CONSUMER_RETENTION": {"slow": timedelta(days=90), "forever": None}}
)
def test_before_replaces_the_global_retention_only() -> None:
    aged(60, "slow")
    aged(1000, "forever")
    aged(10, "other")
    aged(3, "other")
    assert ProcessedEvent.objects.purge(NOW - timedelta(days=5), now=NOW) == 1
    assert left() == [("forever", 1000), ("slow", 60), ("other", 3)]


@override_settings(
    IDEMPOTENCY={"CONSUMER_RETENTION": {"slow": timedelta(days=90), "forever": None}}
)
def test_a_named_consumer_is_purged_alone_and_before_applies_to_it() -> None:
    aged(60, "slow")
    aged(100, "slow")
    aged(1000, "forever")
    aged(40, "other")
    assert ProcessedEvent.objects.purge(consumer="slow", now=NOW) == 1
    assert ProcessedEvent.objects.purge(NOW - timedelta(days=50), consumer="slow", now=NOW) == 1
    assert ProcessedEvent.objects.purge(NOW, consumer="forever", now=NOW) == 0
    assert left() == [("forever", 1000), ("other", 40)]


@override_settings(IDEMPOTENCY={"RETENTION": None, "CONSUMER_RETENTION": {"short": timedelta(1)}})
def test_a_retention_of_none_keeps_records_forever_even_with_before() -> None:
    aged(400, "other")
    aged(2, "short")
    assert ProcessedEvent.objects.purge(NOW - timedelta(days=1), now=NOW) == 1
    assert left() == [("other", 400)]


def test_purgeable_is_what_a_purge_deletes() -> None:
    old, _young = aged(40), aged(10)
    assert list(ProcessedEvent.objects.purgeable(now=NOW)) == [old]


def test_batches_are_bounded_and_report_progress(received: list[tuple[int, str]]) -> None:
    for days in (50, 49, 48, 47, 46):
        aged(days)
    aged(1)
    batches = list(ProcessedEvent.objects.purge_batches(batch_size=2, now=NOW))
    assert [b.deleted for b in batches] == [2, 2, 1]
    assert [b.swept for b in batches] == [2, 4, 5]
    assert {b.span for b in batches} == {5}  # the sweep ends at the newest expired record
    assert received == [(2, "default"), (2, "default"), (1, "default")]
    assert left() == [("tests.consumer", 1)]


def test_a_record_whose_id_is_out_of_order_is_still_purged() -> None:
    # Claims made moments apart may take their ids in the other order than their timestamps.
    later = aged(40)
    earlier = aged(41)
    assert earlier.pk > later.pk
    assert ProcessedEvent.objects.purge(batch_size=1, now=NOW) == 2


def test_an_expired_record_far_out_of_order_waits_for_a_later_purge() -> None:
    # A backdated import: its id is above the newest expired records' by more than the window.
    ProcessedEvent.objects.bulk_create(
        ProcessedEvent(
            consumer="tests.consumer",
            event_id=f"e-{n}",
            processed_at=NOW - timedelta(days=35) + timedelta(seconds=n),
        )
        for n in range(PURGE_TAIL_WINDOW + 1)
    )
    backdated = aged(300)
    assert ProcessedEvent.objects.purge(now=NOW) == PURGE_TAIL_WINDOW + 1
    assert list(ProcessedEvent.objects.all()) == [backdated]
    aged(31)  # once a record claimed after it has expired, the next purge takes it
    assert ProcessedEvent.objects.purge(now=NOW) == 2


def test_nothing_to_purge() -> None:
    assert list(ProcessedEvent.objects.purge_batches(now=NOW)) == []
    aged(1)
    assert list(ProcessedEvent.objects.purge_batches(now=NOW)) == []


@pytest.mark.parametrize("size", [0, -1, 2.5, True])
def test_a_batch_size_must_be_a_positive_integer(size: Any) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        list(ProcessedEvent.objects.purge_batches(batch_size=size))


@override_settings(IDEMPOTENCY={"PURGE_BATCH_SIZE": 1})
def test_the_default_batch_size_is_a_setting() -> None:
    aged(40)
    aged(41)
    assert len(list(ProcessedEvent.objects.purge_batches(now=NOW))) == 2


def test_retention_cutoffs() -> None:
    with override_settings(IDEMPOTENCY={"CONSUMER_RETENTION": {"a": timedelta(days=1), "b": None}}):
        cutoffs = retention_cutoffs(now=NOW)
        assert cutoffs.others == NOW - timedelta(days=30)
        assert cutoffs.consumers == {"a": NOW - timedelta(days=1), "b": None}
        assert cutoffs.latest() == NOW - timedelta(days=1)
        assert retention_cutoffs(consumer="b", now=NOW).consumers == {"b": None}


@pytest.mark.django_db(transaction=True)
def test_each_batch_commits_on_its_own(received: list[tuple[int, str]]) -> None:
    for days in (50, 49, 48):
        aged(days)
    outside: list[bool] = []
    signals.events_purged.connect(receiver := lambda **kw: outside.append(not _in_transaction()))
    try:
        batches = ProcessedEvent.objects.purge_batches(batch_size=1, now=NOW)
        next(batches)
        batches.close()  # as an interrupted purge: the first batch stays deleted
    finally:
        signals.events_purged.disconnect(receiver)
    assert outside == [True]
    assert ProcessedEvent.objects.count() == 2
    assert ProcessedEvent.objects.purge(now=NOW) == 2  # a rerun goes on


def _in_transaction() -> bool:
    return connection.in_atomic_block


@pytest.mark.django_db(transaction=True)
def test_batches_skip_the_wal_flush_only_in_their_own_transaction() -> None:
    aged(40)
    with CaptureQueriesContext(connection) as own:
        ProcessedEvent.objects.purge(now=NOW)
    aged(40)
    with CaptureQueriesContext(connection) as nested, transaction.atomic():
        ProcessedEvent.objects.purge(now=NOW)
    statement = "SET LOCAL synchronous_commit TO OFF"
    expected = 1 if connection.vendor == "postgresql" else 0
    assert [q["sql"] for q in own.captured_queries].count(statement) == expected
    assert statement not in [q["sql"] for q in nested.captured_queries]


def test_each_batch_is_one_primary_key_range() -> None:
    aged(40)
    aged(41)
    with CaptureQueriesContext(connection) as ctx:
        ProcessedEvent.objects.purge(batch_size=10, now=NOW)
    deletes = [q["sql"] for q in ctx.captured_queries if q["sql"].startswith("DELETE")]
    assert len(deletes) == 1
    pk = connection.ops.quote_name("id")
    assert f"{pk} >= " in deletes[0]
    assert f"{pk} < " in deletes[0]
    assert "SELECT" not in deletes[0]  # no pk IN (subquery)


# --- Entity-embedded keys outlive the inbox ------------------------------------------------------


def test_a_redelivery_after_the_purge_still_makes_one_order(catalogue: dict[str, Any]) -> None:
    event = place_order_event()
    place_order.apply(args=[event]).get()
    ProcessedEvent.objects.update(processed_at=timezone.now() - timedelta(days=31))
    call_command("purge_processed_events", stdout=io.StringIO())
    assert not ProcessedEvent.objects.exists()

    result = place_order.apply(args=[event]).get()

    assert result["status"] == "accepted"
    assert Order.objects.filter(original_event_id=event["eventId"]).count() == 1
    assert Product.objects.get(product_id="PROD-A").stock == 98
    assert ProcessedEvent.objects.count() == 1  # claimed again, and recorded again


# --- The management command --------------------------------------------------------------------


def run(*args: str, stdout: io.StringIO | None = None) -> str:
    out = stdout or io.StringIO()
    call_command("purge_processed_events", *args, stdout=out)
    return out.getvalue()


def test_the_command_purges_and_sums_up() -> None:
    aged(40)
    aged(35)
    aged(2)
    output = run()
    assert "Deleted 2 processed-event records in " in output
    assert "rows/s" in output
    assert "every consumer: records processed before" in output
    assert left() == [("tests.consumer", 2)]


@pytest.mark.parametrize(
    ("age", "kept"),
    [("3d", [2880, 840, 30]), ("12h", [30]), ("90m", [30]), ("20m", []), ("600s", [])],
)
def test_older_than(age: str, kept: list[int]) -> None:
    for minutes in (2880, 840, 30):
        ProcessedEventFactory(processed_at=timezone.now() - timedelta(minutes=minutes))
    run("--older-than", age)
    ages = ProcessedEvent.objects.order_by("processed_at").values_list("processed_at", flat=True)
    assert [round((timezone.now() - at).total_seconds() / 60) for at in ages] == kept


def test_dry_run_counts_per_consumer_and_deletes_nothing() -> None:
    aged(40, "a")
    aged(40, "b")
    aged(41, "b")
    aged(1, "b")
    output = run("--dry-run")
    assert "  a: 1\n" in output
    assert "  b: 2\n" in output
    assert "Dry run: 3 records would be deleted; nothing was." in output
    assert ProcessedEvent.objects.count() == 4


def test_consumer_and_batch_size() -> None:
    aged(40, "a")
    aged(40, "b")
    assert "Deleted 1 " in run("--consumer", "a", "--batch-size", "1")
    assert [c for c, _ in left()] == ["b"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--older-than", "30"], "not an age"),
        (["--older-than", "3w"], "not an age"),
        (["--older-than=-1d"], "not an age"),
        (["--older-than", "0h"], "longer than zero"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
        (["--consumer", "forever"], "kept forever"),
        (["--database", "elsewhere"], "not in settings.DATABASES"),
    ],
)
@override_settings(IDEMPOTENCY={"CONSUMER_RETENTION": {"forever": None}})
def test_bad_arguments_are_command_errors(args: list[str], message: str) -> None:
    aged(40)
    with pytest.raises(CommandError, match=message):
        run(*args)
    assert ProcessedEvent.objects.count() == 1


def test_a_bad_argument_exits_non_zero(tmp_path: Any) -> None:
    env = {**os.environ, "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}"}
    env.pop("CELERY_BROKER_URL", None)
    completed = subprocess.run(
        [sys.executable, "manage.py", "purge_processed_events", "--older-than", "soon"],
        cwd=ROOT,
        env={**env, "VAR_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 1
    assert "--older-than 'soon' is not an age" in completed.stderr


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_progress_bar_on_a_terminal_only() -> None:
    aged(40)
    plain = run()
    assert "purging" not in plain
    assert "\r" not in plain
    aged(40)
    shown = run(stdout=Terminal())
    assert "purging" in shown
    assert "1 deleted" in shown
    assert "Deleted 1 processed-event records" in shown


def test_an_interrupted_purge_says_so_and_a_rerun_goes_on(monkeypatch: pytest.MonkeyPatch) -> None:
    for days in (50, 49, 48):
        aged(days)
    update: Callable[..., None] = command._Progress.update
    calls = []

    def interrupt_at_the_second_batch(self: Any, *args: Any) -> None:
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt
        update(self, *args)

    monkeypatch.setattr(command._Progress, "update", interrupt_at_the_second_batch)
    out = io.StringIO()
    with pytest.raises(CommandError) as info:
        run("--batch-size", "1", stdout=out)
    assert info.value.returncode == 130
    assert "Interrupted: 2 records deleted" in out.getvalue()
    assert ProcessedEvent.objects.count() == 1
    monkeypatch.undo()
    assert "Deleted 1 " in run("--batch-size", "1")


@pytest.mark.parametrize(
    ("value", "expected"),
    [("30d", timedelta(days=30)), ("12h", timedelta(hours=12)), (" 90m ", timedelta(minutes=90))],
)
def test_parse_age(value: str, expected: timedelta) -> None:
    assert command.parse_age(value) == expected


# --- The Celery task ---------------------------------------------------------------------------


def test_the_beat_task_purges_like_the_command() -> None:
    aged(40)
    aged(1)
    assert purge_processed_events.apply(kwargs={"batch_size": 1}).get() == 1
    assert left() == [("tests.consumer", 1)]
    assert purge_processed_events.name == "idempotency.tasks.purge_processed_events"


def test_the_purge_is_scheduled_in_the_admins_periodic_tasks() -> None:
    from django_celery_beat.models import PeriodicTask

    task = PeriodicTask.objects.get(task="idempotency.tasks.purge_processed_events")
    assert task.enabled
    assert task.crontab is not None
    assert (task.crontab.hour, task.crontab.minute) == ("3", "17")
