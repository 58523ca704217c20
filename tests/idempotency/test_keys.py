from __future__ import annotations

import dataclasses
import uuid
from decimal import Decimal

import pytest
from django.test import override_settings

from idempotency.exceptions import (
    IdempotencyConfigurationError,
    InvalidEvent,
    InvalidEventId,
    MissingEventId,
)
from idempotency.fingerprint import canonical_json, event_fingerprint, fingerprint, nested_deeper
from idempotency.keys import composite_key, event_id_key, extract_key

EVENT = {"eventId": "e-1", "meta": {"id": 42}, "orderId": "ORD-1", "paymentId": "PAY-9"}


@pytest.mark.parametrize(
    ("spec", "key"),
    [
        ("eventId", "e-1"),
        ("meta.id", "42"),
        (("orderId", "paymentId"), "ORD-1|PAY-9"),
        (lambda e: f"{e['orderId']}:{e['paymentId']}", "ORD-1:PAY-9"),
    ],
)
def test_key_specs(spec: object, key: str) -> None:
    assert extract_key(EVENT, spec) == key  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "event",
    [{}, {"eventId": None}, {"eventId": ""}, {"eventId": "   "}, "not a mapping", None],
)
def test_missing_keys(event: object) -> None:
    with pytest.raises(MissingEventId):
        extract_key(event, "eventId")


@pytest.mark.parametrize("value", [{"a": 1}, [1], True, "x" * 256])
def test_unusable_keys(value: object) -> None:
    with pytest.raises(InvalidEventId):
        extract_key({"eventId": value}, "eventId")


def test_a_composite_key_needs_every_part() -> None:
    with pytest.raises(MissingEventId, match="paymentId"):
        extract_key({"orderId": "ORD-1"}, ("orderId", "paymentId"))


@pytest.mark.parametrize("spec", [42, (), ("a", 1)])
def test_bad_specs_are_configuration_errors(spec: object) -> None:
    with pytest.raises(IdempotencyConfigurationError):
        extract_key(EVENT, spec)  # type: ignore[arg-type]


def test_missing_event_id_is_also_a_value_error() -> None:
    assert issubclass(MissingEventId, ValueError)


def test_fingerprints_ignore_key_order_and_white_space() -> None:
    a = {"b": [1, 2], "a": {"y": "é", "x": 1}}
    b = {"a": {"x": 1, "y": "é"}, "b": [1, 2]}
    assert canonical_json(a) == '{"a":{"x":1,"y":"é"},"b":[1,2]}'
    assert fingerprint(a) == fingerprint(b)
    assert len(fingerprint(a)) == 64
    assert fingerprint(a) != fingerprint({**a, "b": [2, 1]})


# --- Ids no stored key can hold --------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    ["e\x001", "e-1\x00", "\x00", "e\x1b[31m", "a\x7fb", "line\nbreak-inside", "tab\there"],
)
def test_control_characters_are_refused(value: str) -> None:
    with pytest.raises(InvalidEventId, match="control character"):
        extract_key({"eventId": value}, "eventId")
    with pytest.raises(InvalidEventId, match="control character"):
        event_id_key(value)
    with pytest.raises(InvalidEventId):
        extract_key({"a": "x", "b": value}, ("a", "b"))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), Decimal("NaN"), 10**300, b"e-1"])
def test_numbers_and_bytes_that_make_no_key(value: object) -> None:
    with pytest.raises(InvalidEventId):
        extract_key({"eventId": value}, "eventId")
    with pytest.raises(InvalidEventId):
        event_id_key(value)


def test_astronomically_large_numbers_are_refused_not_a_crash() -> None:
    # str() itself refuses past 4300 digits with a bare ValueError.
    with pytest.raises(InvalidEventId, match="255 digits"):
        event_id_key(10**5000)


@pytest.mark.parametrize(
    ("value", "key"),
    [
        (42, "42"),
        (10**30, "1" + "0" * 30),
        (-7, "-7"),
        (1.5, "1.5"),
        (Decimal("12.50"), "12.50"),
        (uuid.UUID(int=1), "00000000-0000-0000-0000-000000000001"),
        (10**254, "1" + "0" * 254),
    ],
)
def test_numbers_and_uuids_are_keys(value: object, key: str) -> None:
    assert extract_key({"eventId": value}, "eventId") == key
    assert event_id_key(value) == key


def test_a_direct_id_is_validated_but_never_altered() -> None:
    assert event_id_key(" e-1 ") == " e-1 "  # as stored by earlier versions
    for empty in ("", "   ", None):
        with pytest.raises(MissingEventId):
            event_id_key(empty)
    with pytest.raises(InvalidEventId, match="at most 255"):
        event_id_key("x" * 256)
    with pytest.raises(InvalidEventId):
        event_id_key(True)


def test_single_keys_are_stripped_as_before() -> None:
    assert extract_key({"eventId": "  e-1\t"}, "eventId") == "e-1"
    assert extract_key({"eventId": 42}, lambda e: f" {e['eventId']} ") == "42"


# --- Composite keys are unambiguous ----------------------------------------------------------


def test_composite_keys_with_a_separator_inside_do_not_collide() -> None:
    spec = ("orderId", "paymentId")
    one = extract_key({"orderId": "ORD-1|A", "paymentId": "PAY-2"}, spec)
    other = extract_key({"orderId": "ORD-1", "paymentId": "A|PAY-2"}, spec)
    assert one != other
    assert (one, other) == ("ORD-1\\|A|PAY-2", "ORD-1|A\\|PAY-2")


def test_composite_keys_with_escapes_inside_do_not_collide() -> None:
    spec = ("a", "b")
    keys = {
        extract_key({"a": "x\\", "b": "y"}, spec),
        extract_key({"a": "x", "b": "\\y"}, spec),
        extract_key({"a": "x\\|", "b": "y"}, spec),
        extract_key({"a": "x", "b": "|y"}, spec),
        extract_key({"a": "x\\", "b": "|y"}, spec),
    }
    assert len(keys) == 5


def test_composite_parts_are_not_stripped() -> None:
    spec = ("orderId", "paymentId")
    assert extract_key({"orderId": " E-1 ", "paymentId": "P"}, spec) == " E-1 |P"
    assert extract_key({"orderId": " E-1 ", "paymentId": "P"}, spec) != extract_key(
        {"orderId": "E-1", "paymentId": "P"}, spec
    )
    with pytest.raises(MissingEventId, match="orderId"):
        extract_key({"orderId": "  ", "paymentId": "P"}, spec)


def test_plain_composite_keys_keep_their_form() -> None:
    assert extract_key({"a": "ORD-1", "b": 9}, ("a", "b")) == "ORD-1|9"
    assert composite_key(["ORD-1", 9]) == "ORD-1|9"
    assert composite_key(["ORD-1|A", "PAY-2"]) == "ORD-1\\|A|PAY-2"


def test_an_escaped_composite_past_the_limit_is_refused() -> None:
    with pytest.raises(InvalidEventId, match="at most 255"):
        extract_key({"a": "|" * 130, "b": "x"}, ("a", "b"))


# --- Fingerprints of typed events, and bounded events ---------------------------------------


@dataclasses.dataclass
class Shipment:
    order_id: str
    weight: Decimal


def test_dataclasses_are_fingerprinted_as_their_fields() -> None:
    assert fingerprint(Shipment("O-1", Decimal("1.5"))) == fingerprint(
        {"weight": "1.5", "order_id": "O-1"}
    )
    assert fingerprint({"s": Shipment("O-1", Decimal("1.5"))}) != fingerprint(
        {"s": Shipment("O-1", Decimal("1.6"))}
    )


def test_pydantic_models_are_fingerprinted_as_their_json_dump() -> None:
    pydantic = pytest.importorskip("pydantic")

    class Refund(pydantic.BaseModel):  # type: ignore[name-defined]
        refund_id: str
        amount: Decimal

    refund = Refund(refund_id="R-1", amount=Decimal("3.00"))
    assert fingerprint(refund) == fingerprint(refund.model_dump(mode="json"))


def nested(depth: int) -> object:
    value: object = "leaf"
    for level in range(depth):
        value = [value] if level % 2 else {"k": value}
    return value


@pytest.mark.parametrize("depth", [65, 200, 950, 5000])
def test_deep_events_are_invalid_not_a_recursion_error(depth: int) -> None:
    with pytest.raises(InvalidEvent, match="MAX_EVENT_DEPTH"):
        event_fingerprint({"eventId": "e-1", "body": nested(depth)})


def test_events_within_the_bounds_are_fingerprinted() -> None:
    event = {"eventId": "e-1", "body": nested(63)}
    assert event_fingerprint(event) == fingerprint(event)
    # Brackets inside strings are no nesting.
    assert event_fingerprint({"text": "[{" * 5000, "list": [[1], [2], {"a": [3]}] * 100})


@override_settings(IDEMPOTENCY={"MAX_EVENT_DEPTH": 3, "MAX_EVENT_BYTES": 100})
def test_the_bounds_are_settings() -> None:
    event_fingerprint({"a": {"b": {"c": 1}}})
    with pytest.raises(InvalidEvent, match="MAX_EVENT_DEPTH"):
        event_fingerprint({"a": {"b": {"c": [1]}}})
    with pytest.raises(InvalidEvent, match="MAX_EVENT_BYTES"):
        event_fingerprint({"a": "x" * 100})
    # Multi-byte characters count as the bytes they take.
    with pytest.raises(InvalidEvent, match="MAX_EVENT_BYTES"):
        event_fingerprint({"a": "é" * 48})  # 56 characters, 104 bytes


def test_circular_and_unencodable_events_are_invalid() -> None:
    loop: list[object] = []
    loop.append(loop)
    with pytest.raises(InvalidEvent, match="no JSON form"):
        event_fingerprint(loop)
    with pytest.raises(InvalidEvent, match="no JSON form"):
        event_fingerprint({"x": object()})


@pytest.mark.parametrize("limit", [0, 1, 2, 5, 64])
def test_nested_deeper_is_exact(limit: int) -> None:
    for depth in range(70):
        document = canonical_json({"x": nested(depth), "y": [[], {}, "]]}}"]})
        assert nested_deeper(document, limit) is (max(depth + 1, 3) > limit), (depth, limit)
