"""The claim against hostile input and hostile callers: what no database can store is refused
with the library's own error before or instead of a database error, on every backend alike.
"""

from __future__ import annotations

import contextlib
from decimal import Decimal
from typing import Any

import pytest
from django.db import DatabaseError, IntegrityError, connection, connections, transaction
from django.db.transaction import TransactionManagementError
from django.test import override_settings

from idempotency.decorators import run_once
from idempotency.exceptions import (
    IdempotencyConfigurationError,
    InvalidEvent,
    InvalidEventId,
    ResultNotSerializable,
)
from idempotency.inbox import claim, idempotent
from idempotency.inbox.write_guard import is_write
from idempotency.keys import composite_key, event_id_key, extract_key
from idempotency.models import ProcessedEvent
from tests.replica import Replica, uses_replica

pytestmark = pytest.mark.django_db(transaction=True)

store_payloads = override_settings(IDEMPOTENCY={"STORE_PAYLOADS": True})


@pytest.mark.parametrize("key", ["\ud800", "evt-\udfff-1", "\udbff\udc00"])
def test_lone_surrogates_are_invalid_ids_not_an_encoding_error(key: str) -> None:
    # No UTF-8 form: the driver would fail with UnicodeEncodeError inside the claim.
    with pytest.raises(InvalidEventId, match="lone surrogate"):
        event_id_key(key)
    with pytest.raises(InvalidEventId):
        extract_key({"eventId": key}, "eventId")
    with pytest.raises(InvalidEventId):
        composite_key(["order-1", key])
    with pytest.raises(InvalidEventId):
        idempotent("c", key)
    assert not connection.in_atomic_block
    assert not ProcessedEvent.objects.exists()


def test_characters_beyond_the_bmp_are_keys() -> None:
    # A real astral character (one code point) is not a surrogate.
    with idempotent("c", "evt-\U0001f600") as first:
        assert not first.duplicate
    with idempotent("c", "evt-\U0001f600") as second:
        assert second.duplicate


@pytest.mark.parametrize("value", [Decimal("sNaN"), Decimal("-sNaN"), Decimal("NaN")])
def test_decimal_nans_are_invalid_ids_not_a_value_error(value: Decimal) -> None:
    with pytest.raises(InvalidEventId, match="finite"):
        event_id_key(value)
    with pytest.raises(InvalidEventId):
        extract_key({"eventId": value}, "eventId")


def test_a_payload_with_a_lone_surrogate_is_an_invalid_event() -> None:
    with pytest.raises(InvalidEvent, match="no JSON form"):
        idempotent("c", "1", payload={"name": "a\ud800b"})
    assert not connection.in_atomic_block


UNSTORABLE_PAYLOADS = [
    {"amount": float("nan")},
    {"amount": float("inf")},
    {"amounts": [1, float("-inf")]},
    {"note": "a\x00b"},
    {"a\x00": 1},
    {"note": "\\\x00"},  # a backslash, then a NUL
]


@pytest.mark.parametrize("payload", UNSTORABLE_PAYLOADS)
def test_a_payload_no_database_can_store_is_an_invalid_event_when_stored(payload: Any) -> None:
    # PostgreSQL's jsonb refuses NaN and \u0000 (DataError); SQLite's JSON_VALID check refuses
    # NaN (IntegrityError): both permanent database errors from inside the claim.
    with store_payloads, pytest.raises(InvalidEvent, match="cannot be stored"):
        idempotent("c", "1", payload=payload)
    assert not connection.in_atomic_block
    assert not ProcessedEvent.objects.exists()


@pytest.mark.parametrize("payload", UNSTORABLE_PAYLOADS)
def test_the_same_payloads_are_fingerprinted_when_not_stored(payload: Any) -> None:
    with idempotent("c", "1", payload=payload) as first:
        assert not first.duplicate
    with idempotent("c", "1", payload=payload) as second:
        assert second.duplicate
    record = ProcessedEvent.objects.get()
    assert record.payload is None
    assert len(record.fingerprint) == 64


def test_a_backslash_u_0000_text_is_not_a_nul() -> None:
    # The six characters \u0000 in a string are JSON-escaped as \\u0000: storable text.
    payload = {"note": "\\u0000", "other": "\\\\u0000"}
    with store_payloads, idempotent("c", "1", payload=payload):
        pass
    assert ProcessedEvent.objects.get().payload == payload


@pytest.mark.parametrize(
    "result",
    [{"note": "a\x00"}, {"\x00": 1}, ["x", "\ud800"], {"k": "\udfff"}],
    ids=["nul-value", "nul-key", "surrogate-in-list", "surrogate-value"],
)
def test_a_result_no_database_can_store_is_result_not_serializable(result: Any) -> None:
    # It used to reach the UPDATE: a DataError on PostgreSQL, stored as is on SQLite.
    with (
        pytest.raises(ResultNotSerializable, match="cannot be stored as JSON"),
        idempotent("c", "1") as first,
    ):
        ProcessedEvent.objects.create(consumer="effect", event_id="1")
        first.result = result
    assert not connection.in_atomic_block
    assert not ProcessedEvent.objects.exists()  # the effect rolled back with the claim
    with idempotent("c", "1") as retry:
        assert not retry.duplicate


def test_a_result_with_backslashes_is_stored() -> None:
    result = {"path": "C:\\u0000\\", "emoji": "\U0001f600"}
    with idempotent("c", "1") as first:
        first.result = result
    assert ProcessedEvent.objects.get().result == result


def test_claim_refuses_the_same_ids() -> None:
    with transaction.atomic():
        with pytest.raises(InvalidEventId):
            claim("c", "x\ud800")
        with pytest.raises(InvalidEventId):
            claim("c", Decimal("sNaN"))


# A block that catches a database error and goes on ------------------------------------------


def _swallow_orm_error() -> None:
    with contextlib.suppress(IntegrityError):
        ProcessedEvent.objects.create(consumer="c", event_id="1")  # the claim's own key


def _swallow_raw_error() -> None:
    # A failed statement aborts a PostgreSQL transaction; SQLite's goes on, and commits.
    if connection.vendor != "postgresql":
        pytest.skip("only PostgreSQL aborts the transaction of a failed statement")
    with contextlib.suppress(DatabaseError), connection.cursor() as cursor:
        cursor.execute("SELECT 1 / 0")


def _assert_nothing_kept_and_usable(calls: list[str]) -> None:
    assert calls == [], "an on_commit callback ran for a transaction that did not commit"
    assert not connection.in_atomic_block
    assert connection.get_autocommit()
    assert not ProcessedEvent.objects.filter(consumer="c").exists()
    with idempotent("c", "1") as retry:
        assert not retry.duplicate
    assert ProcessedEvent.objects.filter(consumer="c", event_id="1").exists()


@pytest.mark.parametrize("swallow", [_swallow_orm_error, _swallow_raw_error], ids=["orm", "raw"])
def test_a_block_that_swallows_a_database_error_fails_instead_of_a_silent_rollback(
    swallow: Any,
) -> None:
    # Before: the block left normally, Django rolled the claim back without a word (PostgreSQL
    # turned the COMMIT of an aborted transaction into a ROLLBACK and still ran the on_commit
    # callbacks): the caller acknowledged an event neither applied nor kept.
    calls: list[str] = []
    with pytest.raises(TransactionManagementError, match="database error was caught"):  # noqa: SIM117
        with idempotent("c", "1"):
            transaction.on_commit(lambda: calls.append("published"))
            swallow()
    _assert_nothing_kept_and_usable(calls)


def test_run_once_does_not_return_as_if_applied() -> None:
    calls: list[str] = []

    def handler() -> None:  # no result: so no UPDATE that would have tripped over the error
        transaction.on_commit(lambda: calls.append("published"))
        _swallow_orm_error()

    with pytest.raises(TransactionManagementError):
        run_once("c", {"eventId": "1"}, handler)
    _assert_nothing_kept_and_usable(calls)


@pytest.mark.parametrize("savepoint", [True, False])
def test_a_nested_claim_that_swallows_an_error_is_not_released_silently(savepoint: bool) -> None:
    with (
        pytest.raises(TransactionManagementError),
        transaction.atomic(),
        idempotent("c", "outer"),
    ):
        with idempotent("c", "1", savepoint=savepoint):
            _swallow_orm_error()
        pytest.fail("the inner claim returned as if applied")
    _assert_nothing_kept_and_usable([])


def test_an_error_caught_in_an_atomic_block_of_its_own_is_fine() -> None:
    with idempotent("c", "1") as first:
        try:
            with transaction.atomic():
                ProcessedEvent.objects.create(consumer="c", event_id="1")
        except IntegrityError:
            pass
        first.result = "kept"
    assert ProcessedEvent.objects.get(consumer="c", event_id="1").result == "kept"


# The write guard: every form of a write, none of a read ---------------------------------------

WRITES = [
    "/* app:orders */ INSERT INTO t VALUES (1)",
    "-- tagged\nUPDATE t SET a = 1",
    "/* a */ -- b\n ( /* multi\nline */ DELETE FROM t",
    "\r\nDELETE FROM t",
    "\f\vTRUNCATE t",
    "insert into t values (1)",
    "COPY t FROM STDIN",
    "COPY t (a) FROM '/tmp/rows.csv'",
    "WITH gone AS (DELETE FROM t RETURNING a) SELECT a FROM gone",
    "UPSERT INTO t VALUES (1)",
]
READS = [
    "SELECT 1",
    "/* INSERT */ SELECT 1",
    "-- UPDATE t\nSELECT a FROM t",
    "COPY (SELECT a FROM t) TO STDOUT",
    "WITH x AS (SELECT 1) SELECT * FROM x",
    "SAVEPOINT s1",
    "RELEASE SAVEPOINT s1",
    "SELECT 'INSERT INTO t'",
    "/* unterminated INSERT",
]


@pytest.mark.parametrize("sql", WRITES)
def test_the_guard_sees_every_form_of_a_write(sql: str) -> None:
    # Leading comments (a query tagger's), \r, \f and COPY ... FROM used to pass as reads.
    assert is_write(sql)


@pytest.mark.parametrize("sql", READS)
def test_the_guard_lets_reads_through(sql: str) -> None:
    assert not is_write(sql)


@pytest.mark.services
@uses_replica
@pytest.mark.parametrize("sql", ["/* orders */ UPDATE idempotency_processedevent SET reason = 'x'"])
def test_a_tagged_raw_write_elsewhere_is_refused_before_it_runs(
    primary_replica: Replica, sql: str
) -> None:
    # The replica refuses writes itself, with 25006, which is_transient() calls a failover: the
    # delivery would be retried for ever. The guard must refuse first, as the configuration
    # error it is; reads on the replica during the claim go on.
    replica = connections[primary_replica.replica]
    with idempotent("c", "1", using=primary_replica.primary) as first:
        assert not first.duplicate
        with replica.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM idempotency_processedevent")
            assert cursor.fetchone() is not None
        with (
            pytest.raises(IdempotencyConfigurationError, match="writes to 'replica'"),
            replica.cursor() as cursor,
        ):
            cursor.execute(sql)
        with (
            pytest.raises(IdempotencyConfigurationError),
            replica.cursor() as cursor,
        ):
            cursor.executemany(
                "-- bulk\nINSERT INTO idempotency_processedevent (consumer) VALUES (%s)", [["a"]]
            )
    assert ProcessedEvent.objects.using(primary_replica.primary).filter(consumer="c").exists()
