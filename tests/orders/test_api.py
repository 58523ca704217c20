"""The HTTP surface: validation, authentication, dispatch after commit, read endpoints."""

from __future__ import annotations

from typing import Any
from unittest import mock

import pytest
from rest_framework.test import APIClient

from orders.models import Order
from tests.factories import OrderFactory, OrderItemFactory, ProductFactory, place_order_event

pytestmark = pytest.mark.django_db


@pytest.fixture
def published() -> Any:
    with mock.patch("orders.tasks.place_order.apply_async") as apply_async:
        yield apply_async


def test_a_valid_event_is_accepted_and_published_after_commit(
    api_client: APIClient, published: mock.Mock, django_capture_on_commit_callbacks: Any
) -> None:
    event = place_order_event()
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        response = api_client.post("/api/events/", event, format="json")
    assert response.status_code == 202
    assert response.json() == {"eventId": event["eventId"], "status": "accepted"}
    assert not published.called  # nothing leaves before the commit
    for callback in callbacks:
        callback()
    (sent,) = published.call_args.args[0]
    assert sent["eventId"] == event["eventId"]
    assert sent["items"] == event["items"]


def test_posting_twice_is_accepted_twice(api_client: APIClient, published: mock.Mock) -> None:
    event = place_order_event()
    for _ in range(2):
        assert api_client.post("/api/events/", event, format="json").status_code == 202


def test_authentication_is_required(published: mock.Mock, db: Any) -> None:
    response = APIClient().post("/api/events/", place_order_event(), format="json")
    assert response.status_code == 401
    assert not published.called


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"eventType": "CancelEverything"}, "eventType"),
        ({"eventId": "not-a-uuid"}, "eventId"),
        ({"timestamp": "yesterday"}, "timestamp"),
        ({"orderId": ""}, "orderId"),
        ({"items": []}, "items"),
        ({"items": [{"productId": "PROD-A", "quantity": 0}]}, "items"),
        ({"items": [{"productId": "PROD-A", "quantity": "two"}]}, "items"),
        ({"items": "PROD-A"}, "items"),
    ],
)
def test_bad_events_get_field_errors(
    api_client: APIClient, published: mock.Mock, overrides: dict[str, Any], field: str
) -> None:
    response = api_client.post("/api/events/", place_order_event(**overrides), format="json")
    assert response.status_code == 400
    assert field in response.json()
    assert not published.called


def test_a_missing_field_is_named(api_client: APIClient, published: mock.Mock) -> None:
    event = place_order_event()
    del event["customerId"]
    response = api_client.post("/api/events/", event, format="json")
    assert response.status_code == 400
    assert response.json() == {"customerId": ["This field is required."]}


def test_a_non_object_body_is_a_400(api_client: APIClient, published: mock.Mock) -> None:
    response = api_client.post("/api/events/", "[1, 2]", content_type="application/json")
    assert response.status_code == 400


def test_read_an_order(api_client: APIClient) -> None:
    item = OrderItemFactory(quantity=2, product=ProductFactory(product_id="PROD-A"))
    order: Order = item.order
    response = api_client.get(f"/api/orders/{order.order_id}/")
    assert response.status_code == 200
    body = response.json()
    assert body["orderId"] == order.order_id
    assert body["customerId"] == order.requested_customer_id
    assert body["status"] == "accepted"
    assert body["originalEventId"] == str(order.original_event_id)
    assert body["items"] == [{"productId": "PROD-A", "quantity": 2, "unitPrice": "10.00"}]


def test_read_a_product(api_client: APIClient) -> None:
    ProductFactory(product_id="PROD-A", name="Widget", price="10.00", stock=7)
    response = api_client.get("/api/products/PROD-A/")
    assert response.json() == {
        "productId": "PROD-A",
        "name": "Widget",
        "price": "10.00",
        "stock": 7,
    }


def test_unknown_order_is_a_404(api_client: APIClient) -> None:
    OrderFactory()
    assert api_client.get("/api/orders/ORD-404/").status_code == 404
