"""The OpenAPI schema says what the API does: schemathesis checks it live (make conformance);
these pin the points it once found."""

from __future__ import annotations

import re
from typing import Any

import pytest
from rest_framework.test import APIClient

from orders.serializers import AMOUNT_PATTERN, ID_PATTERN
from tests.factories import payment_received_event

pytestmark = pytest.mark.django_db


@pytest.fixture
def schema(api_client: APIClient) -> dict[str, Any]:
    response = api_client.get("/api/schema/", {"format": "json"})
    assert response.status_code == 200
    body: dict[str, Any] = response.json()
    return body


def test_a_null_shipped_at_is_declared_nullable(
    schema: dict[str, Any], api_client: APIClient
) -> None:
    assert schema["components"]["schemas"]["Order"]["properties"]["shippedAt"]["nullable"]


@pytest.mark.parametrize(
    "path",
    [
        "/api/orders/{order_id}/",
        "/api/products/{product_id}/",
        "/api/customers/{customer_id}/",
        "/api/events/{event_id}/",
        "/api/orders/requests/{request_id}/",
        "/api/orders/",  # ?page=0
    ],
)
def test_the_404_of_every_read_endpoint_is_documented(schema: dict[str, Any], path: str) -> None:
    assert "404" in schema["paths"][path]["get"]["responses"]


def test_a_page_past_the_last_is_a_404(api_client: APIClient) -> None:
    assert api_client.get("/api/orders/", {"page": 0}).status_code == 404


def test_the_idempotency_key_header_has_its_length_and_pattern(schema: dict[str, Any]) -> None:
    [header] = [
        p
        for p in schema["paths"]["/api/orders/"]["post"]["parameters"]
        if p["in"] == "header" and p["name"] == "Idempotency-Key"
    ]
    assert header["required"] is True
    key = header["schema"]
    assert (key["minLength"], key["maxLength"]) == (1, 255)
    pattern = re.compile(key["pattern"])
    assert pattern.match("6b114c3b-0e01-4b72-8f20-3c8529c75830")
    assert pattern.match('"quoted"')
    for refused in ['""', "with space", "é", "k" * 256]:
        assert not pattern.match(refused)


def test_ids_are_declared_as_the_serializer_checks_them(schema: dict[str, Any]) -> None:
    order_id = schema["components"]["schemas"]["OrderShipped"]["properties"]["orderId"]
    assert order_id["minLength"] == 1  # an empty orderId is refused: the schema says so
    assert order_id["pattern"] == ID_PATTERN


def test_events_refuse_unknown_fields_and_other_types_in_the_schema_too(
    schema: dict[str, Any],
) -> None:
    for name in ("PlaceOrder", "PaymentReceived", "DebitAccount", "OrderShipped"):
        component = schema["components"]["schemas"][name]
        assert component["additionalProperties"] is False
        assert component["properties"]["eventType"]["enum"] == [name]


def test_the_events_body_is_required_and_one_event_or_a_batch(schema: dict[str, Any]) -> None:
    post = schema["paths"]["/api/events/"]["post"]
    body = post["requestBody"]
    assert body["required"] is True
    one, batch = body["content"]["application/json"]["schema"]["oneOf"]
    assert one == {"$ref": "#/components/schemas/Event"}
    assert (batch["type"], batch["items"], batch["minItems"], batch["maxItems"]) == (
        "array",
        one,
        1,
        500,
    )
    accepted = post["responses"]["202"]["content"]["application/json"]["schema"]["oneOf"]
    assert accepted[1]["items"] == accepted[0] == {"$ref": "#/components/schemas/Accepted"}


def test_the_schema_offers_only_json(schema: dict[str, Any]) -> None:
    for path in ("/api/events/", "/api/orders/"):
        assert list(schema["paths"][path]["post"]["requestBody"]["content"]) == ["application/json"]


@pytest.mark.parametrize(
    ("amount", "valid"),
    [
        ("25.00", True),
        ("0.01", True),
        (".5", True),
        ("1000000.00", True),
        ("0007.5", True),
        ("0.00", False),
        ("0", False),
        ("1000000.01", False),
        ("1.005", False),
        ("1e2", False),
        (" 5", False),
    ],
)
def test_the_amount_pattern_is_the_serializers_rule(
    schema: dict[str, Any], api_client: APIClient, amount: str, valid: bool
) -> None:
    published = schema["components"]["schemas"]["PaymentReceived"]["properties"]["amount"]
    assert published["pattern"] == AMOUNT_PATTERN
    assert bool(re.fullmatch(published["pattern"], amount)) is valid
    response = api_client.post("/api/events/", payment_received_event(amount=amount), format="json")
    assert (response.status_code == 202) is valid, response.content


def test_every_operation_documents_the_middlewares_400_and_503(schema: dict[str, Any]) -> None:
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            assert {"400", "503"} <= set(operation["responses"]), (method, path)


def test_a_nul_in_a_query_parameter_is_the_documented_400(api_client: APIClient) -> None:
    assert api_client.get("/api/orders/?%00x=1").status_code == 400
