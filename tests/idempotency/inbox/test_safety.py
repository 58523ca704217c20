"""The claim leaves its atomic block on every path, tells a failed commit from a failing
on_commit callback, stores any result it can encode (and refuses clearly what it cannot), and
takes its timestamps from the database's clock.

These tests commit for real (``transaction=True``) and look at the outcome from a second
connection, as another worker would.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import pytest
from django.db import IntegrityError, connection, transaction
from django.dispatch import Signal
from django.test import override_settings
from django.utils import timezone

from idempotency import signals
from idempotency.clock import database_now
from idempotency.decorators import run_once
from idempotency.exceptions import AfterCommitError, PayloadMismatch, ResultNotSerializable
from idempotency.inbox import idempotent
from idempotency.inbox.statements import STATEMENTS
from idempotency.models import OutboxMessage, ProcessedEvent
from tests.services import in_thread, usable_claim_statements

pytestmark = pytest.mark.django_db(transaction=True)


class Boom(Exception):
    pass


def committed(consumer: str, event_id: str) -> bool:
    """Whether the record is committed, as a second connection (another worker) sees it."""
    seen: list[bool] = []
    errors: list[BaseException] = []

    def look() -> None:
        seen.append(ProcessedEvent.objects.filter(consumer=consumer, event_id=event_id).exists())

    thread = in_thread(look, errors)
    thread.join(20)
    assert not errors, errors
    return seen[0]


def assert_connection_is_clean() -> None:
    """Not left inside an atomic block: the next claim commits on its own."""
    assert not connection.in_atomic_block
    assert connection.get_autocommit()
    with idempotent("next", "after") as claim:
        assert not claim.duplicate
    assert committed("next", "after"), "a later claim did not commit"


class Receivers:
    """Signal receivers that raise, disconnected by :meth:`stop` (or at the test's end)."""

    def __init__(self) -> None:
        self.connected: list[tuple[Signal, Callable[..., None]]] = []

    def raise_on(self, signal: Signal) -> None:
        def receiver(**kwargs: Any) -> None:
            raise Boom(f"a receiver of {kwargs['event_id']} failed")

        signal.connect(receiver, weak=False)
        self.connected.append((signal, receiver))

    def stop(self) -> None:
        while self.connected:
            signal, receiver = self.connected.pop()
            signal.disconnect(receiver)


@pytest.fixture
def raising() -> Iterator[Receivers]:
    receivers = Receivers()
    yield receivers
    receivers.stop()


# --- Every path leaves the atomic block ------------------------------------------------------


def test_a_raising_duplicate_discarded_receiver(raising: Receivers) -> None:
    with idempotent("billing", "e-1"):
        pass
    raising.raise_on(signals.duplicate_discarded)
    with pytest.raises(Boom), idempotent("billing", "e-1"):
        pytest.fail("a duplicate's block ran")
    raising.stop()
    assert_connection_is_clean()


@pytest.mark.parametrize("on_mismatch", ["raise", "discard"])
def test_a_raising_payload_mismatch_receiver(raising: Receivers, on_mismatch: str) -> None:
    with idempotent("billing", "e-1", payload={"amount": 10}):
        pass
    raising.raise_on(signals.payload_mismatch)
    with (
        pytest.raises(Boom),
        idempotent("billing", "e-1", payload={"amount": 11}, on_mismatch=on_mismatch),
    ):
        pytest.fail("a mismatching duplicate's block ran")
    raising.stop()
    assert_connection_is_clean()
    # The failed note is rolled back whole: no half-written mismatch.
    assert not ProcessedEvent.objects.get(event_id="e-1").has_mismatch


def test_a_mismatch_inside_a_callers_transaction_leaves_it_usable(
    raising: Receivers,
) -> None:
    with idempotent("billing", "e-1", payload={"amount": 10}):
        pass
    raising.raise_on(signals.payload_mismatch)
    with transaction.atomic():
        with pytest.raises(Boom), idempotent("billing", "e-1", payload={"amount": 11}):
            pass
        raising.stop()
        # The caller's transaction is not aborted: it still reads and writes.
        with idempotent("billing", "e-2"):
            pass
    assert committed("billing", "e-2")
    assert_connection_is_clean()


def test_a_raising_event_processed_receiver_rolls_the_effect_back(
    raising: Receivers,
) -> None:
    raising.raise_on(signals.event_processed)
    with pytest.raises(Boom), idempotent("billing", "e-1"):
        ProcessedEvent.objects.create(consumer="effect", event_id="debit-1")
    raising.stop()
    assert not committed("billing", "e-1")
    assert not committed("effect", "debit-1")
    assert_connection_is_clean()


def test_a_failing_duplicate_count_leaves_the_atomic_block(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # What a serialization failure of the duplicate_count UPDATE does, on any database.
    with idempotent("billing", "e-1"):
        pass

    def failing_update(self: Any, **kwargs: Any) -> int:
        raise Boom("could not serialize access due to concurrent update")

    monkeypatch.setattr("django.db.models.query.QuerySet.update", failing_update)
    with (
        override_settings(IDEMPOTENCY={"RECORD_DUPLICATES": True}),
        pytest.raises(Boom),
        idempotent("billing", "e-1"),
    ):
        pass
    monkeypatch.undo()
    assert_connection_is_clean()


def test_a_mismatch_still_raises_payload_mismatch_and_is_noted() -> None:
    with idempotent("billing", "e-1", payload={"amount": 10}):
        pass
    with pytest.raises(PayloadMismatch), idempotent("billing", "e-1", payload={"amount": 11}):
        pass
    assert ProcessedEvent.objects.get(event_id="e-1").has_mismatch
    assert_connection_is_clean()


# --- AfterCommitError: a commit that happened, then a callback that raised ------------------


def test_a_raising_on_commit_callback_is_an_after_commit_error() -> None:
    ran: list[str] = []

    def callback() -> None:
        ran.append("callback")
        raise Boom("publish failed")

    with pytest.raises(AfterCommitError) as info, idempotent("billing", "e-1"):
        ProcessedEvent.objects.create(consumer="effect", event_id="debit-1")
        transaction.on_commit(callback)
    assert isinstance(info.value.__cause__, Boom)
    assert (info.value.consumer, info.value.event_id) == ("billing", "e-1")
    assert ran == ["callback"]
    # The delivery is done: the effect and its record are durable.
    assert committed("billing", "e-1")
    assert committed("effect", "debit-1")
    assert_connection_is_clean()
    with idempotent("billing", "e-1") as again:
        assert again.duplicate


def test_run_once_raises_after_commit_error_too() -> None:
    def handler() -> str:
        transaction.on_commit(lambda: (_ for _ in ()).throw(Boom("after")))
        return "done"

    with pytest.raises(AfterCommitError):
        run_once("billing", {"eventId": "e-1"}, handler)
    assert committed("billing", "e-1")


def test_a_callback_of_an_enclosing_transaction_is_not_the_claims_to_report() -> None:
    # Nested, the claim commits nothing itself: the caller's atomic runs the callbacks.
    with pytest.raises(Boom), transaction.atomic(), idempotent("billing", "e-1"):
        transaction.on_commit(lambda: (_ for _ in ()).throw(Boom("outer")))
    assert committed("billing", "e-1")


@pytest.fixture
def deferred_table() -> Iterator[str]:
    """A table whose constraint is checked at COMMIT, so the commit itself fails."""
    if connection.vendor == "mysql":
        pytest.skip("MariaDB and MySQL check every constraint at once, none at COMMIT")
    name = f"idem_deferred_{os.getpid()}"
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(f"CREATE TABLE {name} (x integer UNIQUE DEFERRABLE INITIALLY DEFERRED)")
        else:
            cursor.execute(f"CREATE TABLE {name}_parent (id integer PRIMARY KEY)")
            cursor.execute(
                f"CREATE TABLE {name} (x integer REFERENCES {name}_parent (id) "
                "DEFERRABLE INITIALLY DEFERRED)"
            )
    yield name
    with connection.cursor() as cursor:
        cursor.execute(f"DROP TABLE {name}")
        if connection.vendor != "postgresql":
            cursor.execute(f"DROP TABLE {name}_parent")


def violate_at_commit(table: str) -> None:
    with connection.cursor() as cursor:
        # PostgreSQL: a duplicate; SQLite: a dangling reference. Either fails only at COMMIT.
        cursor.execute(f"INSERT INTO {table} (x) VALUES (1)")
        if connection.vendor == "postgresql":
            cursor.execute(f"INSERT INTO {table} (x) VALUES (1)")


def test_a_failed_commit_is_not_an_after_commit_error(deferred_table: str) -> None:
    ran: list[str] = []
    with pytest.raises(IntegrityError) as info, idempotent("billing", "e-1"):
        violate_at_commit(deferred_table)
        transaction.on_commit(lambda: ran.append("callback"))
    assert not isinstance(info.value, AfterCommitError)
    assert ran == [], "a callback ran although nothing committed"
    assert not committed("billing", "e-1")
    assert_connection_is_clean()
    with idempotent("billing", "e-1") as retry:
        assert not retry.duplicate


# --- Results and payloads with no plain JSON type -------------------------------------------


WHEN = dt.datetime(2026, 1, 2, 3, 4, 5, 600000, tzinfo=dt.timezone.utc)
ID = uuid.UUID("12345678-1234-5678-1234-567812345678")


def test_decimal_datetime_and_uuid_results_are_stored() -> None:
    result = {"balance": Decimal("90.10"), "at": WHEN, "id": ID, "day": WHEN.date()}
    first = run_once("billing", {"eventId": "e-1"}, lambda: result)
    assert first is result  # the first delivery gets what the handler returned
    again: dict[str, str] = run_once("billing", {"eventId": "e-1"}, lambda: pytest.fail("ran"))
    assert again == {
        "balance": "90.10",
        "at": "2026-01-02T03:04:05.600Z",
        "id": str(ID),
        "day": "2026-01-02",
    }
    assert Decimal(again["balance"]) == Decimal("90.10")


def test_a_model_instance_result_is_refused_clearly_and_rolled_back() -> None:
    message = OutboxMessage(task_name="orders.tasks.ship", args=[1])
    with pytest.raises(ResultNotSerializable, match="OutboxMessage") as info:
        run_once(
            "billing",
            {"eventId": "e-1"},
            lambda: ProcessedEvent.objects.create(consumer="effect", event_id="d") and message,
        )
    assert "result_serializer" in str(info.value)
    assert isinstance(info.value, TypeError)
    assert not committed("billing", "e-1")
    assert not committed("effect", "d")
    assert_connection_is_clean()


def test_a_result_serializer_turns_the_result_into_what_is_stored() -> None:
    message = OutboxMessage(task_name="orders.tasks.ship", args=[1])

    def serialize(value: OutboxMessage) -> dict[str, Any]:
        return {"task_id": value.task_id, "task": value.task_name}

    first = run_once("billing", {"eventId": "e-1"}, lambda: message, result_serializer=serialize)
    assert first is message
    stored = ProcessedEvent.objects.get(event_id="e-1").result
    assert stored == {"task_id": str(message.task_id), "task": "orders.tasks.ship"}
    again = run_once("billing", {"eventId": "e-1"}, lambda: message, result_serializer=serialize)
    assert again == stored


@pytest.mark.parametrize("value", [float("nan"), {"x": float("inf")}, {1, 2}, object()])
def test_other_results_without_a_json_form(value: object) -> None:
    with pytest.raises(ResultNotSerializable), idempotent("billing", "e-1") as claim:
        claim.result = value
    assert not committed("billing", "e-1")


def test_an_unstored_result_is_not_checked() -> None:
    with idempotent("billing", "e-1", store_result=False) as claim:
        claim.result = object()
    assert committed("billing", "e-1")


@dataclasses.dataclass
class Payment:
    payment_id: str
    amount: Decimal
    at: dt.datetime


@override_settings(IDEMPOTENCY={"STORE_PAYLOADS": True})
def test_payloads_with_decimals_datetimes_uuids_and_dataclasses_are_stored() -> None:
    event = {"eventId": ID, "payment": Payment("P-1", Decimal("10.50"), WHEN)}
    with idempotent("billing", "e-1", payload=event):
        pass
    record = ProcessedEvent.objects.get()
    assert record.payload == {
        "eventId": str(ID),
        "payment": {"payment_id": "P-1", "amount": "10.50", "at": "2026-01-02T03:04:05.600Z"},
    }
    same = {"payment": Payment("P-1", Decimal("10.50"), WHEN), "eventId": ID}
    with idempotent("billing", "e-1", payload=same) as claim:
        assert claim.duplicate  # the same fingerprint
    changed = {"eventId": ID, "payment": Payment("P-1", Decimal("10.51"), WHEN)}
    with pytest.raises(PayloadMismatch), idempotent("billing", "e-1", payload=changed):
        pass
    mismatch_payload = ProcessedEvent.objects.get().mismatch_payload
    assert mismatch_payload is not None
    assert mismatch_payload["payment"]["amount"] == "10.51"


# --- The database's clock --------------------------------------------------------------------


@pytest.fixture
def clock_behind(monkeypatch: pytest.MonkeyPatch) -> dt.timedelta:
    """The process's clock two hours behind the database's."""
    skew = dt.timedelta(hours=2)
    real_now = timezone.now
    monkeypatch.setattr(timezone, "now", lambda: real_now() - skew)
    return skew


@pytest.mark.parametrize("name", list(STATEMENTS))
def test_every_claim_statement_takes_the_database_clock(
    name: str, clock_behind: dt.timedelta
) -> None:
    if name not in usable_claim_statements():
        pytest.skip(f"{name} is not for {connection.vendor}")
    before = database_now("default")
    with transaction.atomic():
        record, created = STATEMENTS[name]("default", "billing", "e-1", {})
    after = database_now("default")
    assert created
    assert isinstance(record.processed_at, dt.datetime)
    assert before - dt.timedelta(seconds=1) <= record.processed_at <= after
    assert record.processed_at == ProcessedEvent.objects.get().processed_at
    assert record.processed_at - timezone.now() > clock_behind - dt.timedelta(minutes=1)


def test_timestamps_keep_sub_second_precision() -> None:
    for n in range(5):
        with idempotent("billing", f"e-{n}"):
            pass
    stamps = list(ProcessedEvent.objects.values_list("processed_at", flat=True))
    assert any(stamp.microsecond for stamp in stamps), stamps  # not whole seconds


@override_settings(IDEMPOTENCY={"RETENTION": dt.timedelta(hours=1)})
def test_a_worker_clock_behind_cannot_get_a_fresh_record_purged(
    clock_behind: dt.timedelta,
) -> None:
    with idempotent("billing", "e-1"):
        pass
    # The purging process's clock is behind too, or ahead: the cut-off is the database's.
    assert ProcessedEvent.objects.purge() == 0
    assert committed("billing", "e-1")


@override_settings(IDEMPOTENCY={"RETENTION": dt.timedelta(hours=1)})
def test_a_purge_with_its_clock_ahead_keeps_fresh_records(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with idempotent("billing", "e-1"):
        pass
    real_now = timezone.now
    monkeypatch.setattr(timezone, "now", lambda: real_now() + dt.timedelta(hours=2))
    assert not ProcessedEvent.objects.purgeable().exists()
    assert ProcessedEvent.objects.purge() == 0
    # An explicit now is still obeyed.
    assert ProcessedEvent.objects.purge(now=database_now("default") + dt.timedelta(hours=2)) == 1
