"""The claim primitive: one transaction, scope, duplicates, mismatches, results, rejection."""

from __future__ import annotations

import uuid

import pytest
from django.db import connection, connections, transaction
from django.test import override_settings
from django.test.utils import CaptureQueriesContext

from idempotency import signals
from idempotency.decorators import run_once
from idempotency.exceptions import (
    IdempotencyConfigurationError,
    InvalidConsumerName,
    InvalidEvent,
    InvalidEventId,
    PayloadMismatch,
    TransactionRequired,
)
from idempotency.inbox import claim, current_claim, idempotent, reject, statements
from idempotency.inbox.statements import STATEMENTS, statement_for, supports_insert_select
from idempotency.keys import MAX_CONSUMER_LENGTH
from idempotency.models import Outcome, ProcessedEvent
from tests.services import usable_claim_statements

pytestmark = pytest.mark.django_db


class Boom(Exception):
    pass


def test_first_delivery_runs_and_records() -> None:
    with idempotent("billing", "e-1") as c:
        assert not c.duplicate
        ran = True
    assert ran
    record = ProcessedEvent.objects.get()
    assert (record.consumer, record.event_id, record.outcome) == ("billing", "e-1", "processed")
    assert record.pk == c.record.pk  # type: ignore[union-attr]


def test_second_delivery_is_a_duplicate() -> None:
    with idempotent("billing", "e-1"):
        pass
    with idempotent("billing", "e-1") as c:
        assert c.duplicate
    assert ProcessedEvent.objects.count() == 1


def test_a_raising_block_leaves_no_record_so_a_retry_processes_again() -> None:
    with pytest.raises(Boom), idempotent("billing", "e-1"):
        ProcessedEvent.objects.create(consumer="side-effect", event_id="x")
        raise Boom
    assert not ProcessedEvent.objects.exists()  # the claim and the block's write rolled back
    with idempotent("billing", "e-1") as c:
        assert not c.duplicate


def test_consumers_are_scoped() -> None:
    with idempotent("billing", "e-1") as first, idempotent("shipping", "e-1") as second:
        assert not first.duplicate
        assert not second.duplicate
    assert ProcessedEvent.objects.for_event("e-1").count() == 2


def test_result_is_stored_and_replayed() -> None:
    with idempotent("billing", "e-1") as c:
        c.result = {"balance": "90.00"}
    with idempotent("billing", "e-1") as again:
        assert again.duplicate
        assert again.result == {"balance": "90.00"}


def test_results_are_not_stored_when_disabled() -> None:
    with idempotent("billing", "e-1", store_result=False) as c:
        c.result = {"balance": "90.00"}
    assert ProcessedEvent.objects.get().result is None


def test_same_payload_is_a_plain_duplicate() -> None:
    with idempotent("billing", "e-1", payload={"amount": 10, "to": "x"}):
        pass
    with idempotent("billing", "e-1", payload={"to": "x", "amount": 10}) as c:
        assert c.duplicate
    assert not ProcessedEvent.objects.get().has_mismatch


def test_different_payload_raises_and_is_recorded() -> None:
    received: list[dict[str, object]] = []

    def receiver(**kwargs: object) -> None:
        received.append(kwargs)

    signals.payload_mismatch.connect(receiver)
    try:
        with idempotent("billing", "e-1", payload={"amount": 10}):
            pass
        ran = False
        with (
            pytest.raises(PayloadMismatch) as info,
            idempotent("billing", "e-1", payload={"amount": 11}),
        ):
            ran = True
    finally:
        signals.payload_mismatch.disconnect(receiver)
    assert not ran
    record = ProcessedEvent.objects.get()
    assert record.has_mismatch
    assert info.value.stored_fingerprint == record.fingerprint
    assert info.value.received_fingerprint == record.mismatch_fingerprint
    assert record.mismatch_at is not None
    assert len(received) == 1
    assert received[0]["received_fingerprint"] == record.mismatch_fingerprint


def test_different_payload_can_be_discarded() -> None:
    with idempotent("billing", "e-1", payload={"amount": 10}) as c:
        c.result = "first"
    with idempotent("billing", "e-1", payload={"amount": 11}, on_mismatch="discard") as c:
        assert c.duplicate
        assert c.result == "first"
    assert ProcessedEvent.objects.get().has_mismatch


def test_unknown_mismatch_policy_is_a_configuration_error() -> None:
    with pytest.raises(IdempotencyConfigurationError):
        idempotent("billing", "e-1", on_mismatch="ignore")


def test_reject_records_a_final_outcome_and_keeps_business_writes() -> None:
    with idempotent("orders", "e-1") as c:
        assert current_claim() is c
        ProcessedEvent.objects.create(consumer="business-row", event_id="x")
        reject("insufficient stock")
    assert current_claim() is None
    record = ProcessedEvent.objects.get(consumer="orders")
    assert (record.outcome, record.reason) == (Outcome.REJECTED, "insufficient stock")
    assert ProcessedEvent.objects.filter(consumer="business-row").exists()


def test_reject_outside_a_claim_is_an_error() -> None:
    with pytest.raises(TransactionRequired):
        reject("no")


def test_signals_are_sent() -> None:
    seen: list[str] = []

    def on_processed(**kwargs: object) -> None:
        seen.append(f"processed {kwargs['event_id']}")

    def on_duplicate(**kwargs: object) -> None:
        seen.append(f"duplicate {kwargs['event_id']}")

    signals.event_processed.connect(on_processed)
    signals.duplicate_discarded.connect(on_duplicate)
    try:
        for _ in range(2):
            with idempotent("billing", "e-1"):
                pass
    finally:
        signals.event_processed.disconnect(on_processed)
        signals.duplicate_discarded.disconnect(on_duplicate)
    assert seen == ["processed e-1", "duplicate e-1"]


def test_log_lines_carry_consumer_and_event_id(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="idempotency")
    for _ in range(2):
        with idempotent("billing", "e-1"):
            pass
    records = [r for r in caplog.records if r.name == "idempotency"]
    assert [(r.consumer, r.event_id) for r in records] == [("billing", "e-1")] * 2  # type: ignore[attr-defined]
    assert "discarded" in records[1].getMessage()


@pytest.mark.django_db(transaction=True)
def test_claim_outside_a_transaction_is_refused() -> None:
    with pytest.raises(TransactionRequired):
        claim("billing", "e-1")
    assert not ProcessedEvent.objects.exists()


def test_nested_inside_the_callers_transaction() -> None:
    with transaction.atomic():
        with idempotent("billing", "e-1") as c:
            assert not c.duplicate
        with idempotent("billing", "e-1") as c:
            assert c.duplicate
    assert ProcessedEvent.objects.count() == 1


def test_a_failed_nested_claim_leaves_the_callers_transaction_usable() -> None:
    with transaction.atomic():
        with pytest.raises(Boom), idempotent("billing", "e-1"):
            raise Boom
        with idempotent("billing", "e-2"):
            pass
    assert list(ProcessedEvent.objects.values_list("event_id", flat=True)) == ["e-2"]


@pytest.mark.parametrize("name", list(STATEMENTS))
def test_every_claim_statement_has_get_or_create_semantics(name: str) -> None:
    if name not in usable_claim_statements():
        pytest.skip(f"{name} is not for {connection.vendor}")
    statement = STATEMENTS[name]
    with transaction.atomic():
        record, created = statement("default", "billing", "e-1", {"fingerprint": "f" * 64})
        assert created
        assert record.pk is not None
        assert record.outcome == Outcome.PROCESSED
        assert record.processed_at is not None
        again, created_again = statement("default", "billing", "e-1", {"fingerprint": "0" * 64})
        assert not created_again
        assert again.pk == record.pk
        assert again.fingerprint == "f" * 64
        assert again.processed_at == ProcessedEvent.objects.get().processed_at
        # The transaction is still usable after the conflict (no aborted transaction).
        assert ProcessedEvent.objects.count() == 1
    with transaction.atomic():
        ProcessedEvent.objects.filter(pk=record.pk).update(result={"n": [1, "2"]})
        stored, _ = statement("default", "billing", "e-1", {})
        assert stored.result == {"n": [1, "2"]}


def test_each_backend_uses_its_fastest_statement() -> None:
    expected = {
        "postgresql": (
            "insert_select_when_duplicate"
            if supports_insert_select(connection)
            else "insert_returning"
        ),
        "sqlite": "insert_returning",
        "mysql": "insert_on_duplicate",
    }
    assert statement_for(connection) is STATEMENTS[expected[connection.vendor]]


def test_claims_cost_one_statement_on_first_delivery(
    django_assert_num_queries,  # type: ignore[no-untyped-def]
) -> None:
    with transaction.atomic():
        with django_assert_num_queries(1) as first:
            claim("billing", "e-1")
        # Duplicates rare so far: the duplicate reads the record in a statement of its own.
        with django_assert_num_queries(2):
            claim("billing", "e-1")
    assert "SELECT" not in first.captured_queries[0]["sql"]


def _claim_in_own_transaction(consumer: str, event_id: str) -> list[str]:
    with CaptureQueriesContext(connection) as queries, transaction.atomic():
        claim(consumer, event_id)
    # The claim's own statements, without the transaction's (a savepoint inside the test's).
    return [q["sql"] for q in queries.captured_queries if q["sql"].startswith(("INSERT", "SELECT"))]


def test_a_run_of_duplicates_brings_the_select_into_the_insert_s_round_trip() -> None:
    if statement_for(connection) is not STATEMENTS["insert_select_when_duplicate"]:
        pytest.skip("the adaptive statement runs on PostgreSQL with psycopg 3's client binding")
    for n in range(3):
        _claim_in_own_transaction("billing", f"e-{n}")
    assert statements.duplicate_rate("default", "billing") == 0.0
    sent = [_claim_in_own_transaction("billing", "e-0") for _ in range(8)]
    # The first duplicates take two statements each, then the estimate passes a third and the
    # select rides with the insert: one execute, both statements in it.
    assert [len(s) for s in sent[:4]] == [2, 2, 2, 2]
    assert all(len(s) == 1 and "; SELECT" in s[0] for s in sent[4:]), sent
    assert statements.duplicate_rate("default", "billing") > 1 / 2
    # Another consumer's estimate is its own.
    assert len(_claim_in_own_transaction("shipping", "e-0")) == 1
    assert statements.duplicate_rate("default", "shipping") == 0.0
    # First deliveries bring the estimate back down, and the select leaves the first delivery.
    for n in range(10, 30):
        last = _claim_in_own_transaction("billing", f"e-{n}")
    assert statements.duplicate_rate("default", "billing") < 1 / 3
    assert len(last) == 1
    assert "SELECT" not in last[0]
    assert ProcessedEvent.objects.filter(consumer="billing").count() == 23


def test_the_duplicate_estimates_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    if statement_for(connection) is not STATEMENTS["insert_select_when_duplicate"]:
        pytest.skip("the adaptive statement runs on PostgreSQL with psycopg 3's client binding")
    monkeypatch.setattr(statements, "_MAX_ESTIMATES", 5)
    for n in range(12):
        _claim_in_own_transaction(f"tenant-{n}", "e-1")
        assert len(statements._duplicate_rates) <= 5


def test_payloads_are_not_stored_by_default() -> None:
    with idempotent("billing", "e-1", payload={"card": "4111"}):
        pass
    assert ProcessedEvent.objects.get().payload is None


@pytest.mark.parametrize("on_mismatch", ["raise", "discard"])
def test_stored_payloads_keep_both_sides_of_a_mismatch(on_mismatch: str) -> None:
    with override_settings(IDEMPOTENCY={"STORE_PAYLOADS": True}):
        with idempotent("billing", "e-1", payload={"amount": 10}):
            pass
        try:
            with idempotent("billing", "e-1", payload={"amount": 11}, on_mismatch=on_mismatch):
                pass
        except PayloadMismatch:
            assert on_mismatch == "raise"
    record = ProcessedEvent.objects.get()
    assert record.payload == {"amount": 10}
    assert record.mismatch_payload == {"amount": 11}


@override_settings(IDEMPOTENCY={})
def test_duplicates_are_counted_only_when_asked() -> None:
    with idempotent("billing", "e-1"):
        pass
    with CaptureQueriesContext(connection) as queries, idempotent("billing", "e-1"):
        pass
    # By default a duplicate is read-only.
    assert not [q for q in queries if q["sql"].upper().startswith(("UPDATE", "DELETE"))]
    assert ProcessedEvent.objects.get().duplicate_count == 0
    with override_settings(IDEMPOTENCY={"RECORD_DUPLICATES": True}):
        for _ in range(2):
            with idempotent("billing", "e-1") as claim_:
                assert claim_.duplicate
    record = ProcessedEvent.objects.get()
    assert record.duplicate_count == 2
    assert record.last_duplicate_at is not None


@pytest.mark.parametrize("event_id", ["e\x00-1", "e-1\n", "x" * 256, True, float("nan"), ""])
def test_ids_no_key_can_hold_are_refused_before_the_claim(event_id: object) -> None:
    with pytest.raises(InvalidEventId):
        idempotent("billing", event_id)
    with pytest.raises(InvalidEventId), transaction.atomic():
        claim("billing", event_id)
    assert not ProcessedEvent.objects.exists()


@pytest.mark.parametrize(
    ("consumer", "message"),
    [
        ("bill\x00ing", "cannot hold a NUL"),
        ("billing\ud800", "lone surrogate"),
        ("b" * (MAX_CONSUMER_LENGTH + 1), "at most 200 characters, not 201"),
        ("", "a consumer name is required"),
        (None, "must be a string, not NoneType"),
        (7, "must be a string, not int"),
        (b"billing", "must be a string, not bytes"),
        (["billing"], "must be a string, not list"),
    ],
    ids=["nul", "surrogate", "too-long", "empty", "none", "int", "bytes", "list"],
)
def test_consumer_names_the_inbox_cannot_store_are_refused_before_the_claim(
    consumer: object, message: str
) -> None:
    # Unchecked, these reached the database: PostgreSQL raised DataError or ProgrammingError
    # from inside the claim, SQLite stored a NUL, an int or an over-long name as it was.
    for _ in range(2):  # a refused name is not remembered as valid
        with pytest.raises(InvalidConsumerName, match=message):
            idempotent(consumer, "e-1")  # type: ignore[arg-type]
        with pytest.raises(InvalidConsumerName, match=message), transaction.atomic():
            claim(consumer, "e-1")  # type: ignore[arg-type]
        with pytest.raises(InvalidConsumerName, match=message):
            run_once(consumer, {"eventId": "e-1"}, lambda: None)  # type: ignore[arg-type]
    assert not ProcessedEvent.objects.exists()


def test_an_invalid_consumer_name_is_a_configuration_error_and_a_value_error() -> None:
    with pytest.raises(IdempotencyConfigurationError):
        idempotent("x" * 500, "e-1")
    with pytest.raises(ValueError, match="consumer name"):
        idempotent("x\x00", "e-1")


def test_the_longest_consumer_name_fits_the_column_and_is_stored_exactly() -> None:
    assert ProcessedEvent._meta.get_field("consumer").max_length == MAX_CONSUMER_LENGTH
    longest = "ü" * MAX_CONSUMER_LENGTH  # characters, not bytes: 400 bytes in UTF-8
    for _ in range(2):  # the second claim takes the remembered name: a duplicate
        with idempotent(longest, "e-1") as claim_:
            pass
    assert claim_.duplicate
    with transaction.atomic():
        record, created = claim("billing\ttab", "e-1")
    assert record.consumer == "billing\ttab"
    assert created
    assert sorted(ProcessedEvent.objects.values_list("consumer", flat=True)) == sorted(
        [longest, "billing\ttab"]
    )


def test_integer_and_uuid_ids_are_claimed_as_text() -> None:
    with idempotent("billing", 10**30) as first:
        assert first.event_id == "1" + "0" * 30
    with idempotent("billing", uuid.UUID(int=5)):
        pass
    assert set(ProcessedEvent.objects.values_list("event_id", flat=True)) == {
        "1" + "0" * 30,
        "00000000-0000-0000-0000-000000000005",
    }


def test_a_deep_payload_is_an_invalid_event_before_any_transaction() -> None:
    deep: object = 1
    for _ in range(950):
        deep = [deep]
    with CaptureQueriesContext(connection) as queries, pytest.raises(InvalidEvent):
        idempotent("billing", "e-1", payload={"eventId": "e-1", "body": deep})
    assert len(queries) == 0
    with pytest.raises(InvalidEvent):
        run_once("billing", {"eventId": "e-1", "body": deep}, lambda: None)
    assert not ProcessedEvent.objects.exists()


def test_one_database_installs_no_write_guard() -> None:
    # The guard against writes to another database costs a single-database project nothing.
    assert len(connections.settings) == 1
    with idempotent("billing", "e-1") as c:
        assert not c.duplicate
        assert connection.execute_wrappers == []
