from __future__ import annotations

import pytest

from idempotency.exceptions import (
    IdempotencyConfigurationError,
    InvalidEventId,
    MissingEventId,
)
from idempotency.fingerprint import canonical_json, fingerprint
from idempotency.keys import extract_key

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
