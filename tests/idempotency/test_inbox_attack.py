"""The claim against hostile input and hostile callers: what no database can store is refused
with the library's own error before or instead of a database error, on every backend alike.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from django.db import connection
from django.test import override_settings

from idempotency.exceptions import InvalidEvent, InvalidEventId, ResultNotSerializable
from idempotency.inbox import claim, idempotent
from idempotency.keys import composite_key, event_id_key, extract_key
from idempotency.models import ProcessedEvent

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
    from django.db import transaction

    with transaction.atomic():
        with pytest.raises(InvalidEventId):
            claim("c", "x\ud800")
        with pytest.raises(InvalidEventId):
            claim("c", Decimal("sNaN"))
