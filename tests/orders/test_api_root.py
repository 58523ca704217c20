"""The API root that ``make run`` advertises: a map of the endpoints, behind the same login."""

from __future__ import annotations

import pytest
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from tests.factories import UserFactory, place_order_event

pytestmark = pytest.mark.django_db


def test_the_root_lists_every_endpoint_as_an_absolute_url(api_client: APIClient) -> None:
    response = api_client.get("/api/")
    assert response.status_code == 200
    links = response.json()
    assert links == {
        "events": "http://testserver/api/events/",
        "eventStatus": "http://testserver/api/events/{eventId}/",
        "orders": "http://testserver/api/orders/",
        "orderRequest": "http://testserver/api/orders/requests/{requestId}/",
        "order": "http://testserver/api/orders/{orderId}/",
        "product": "http://testserver/api/products/{productId}/",
        "customer": "http://testserver/api/customers/{customerId}/",
        "schema": "http://testserver/api/schema/",
        "docs": "http://testserver/api/docs/",
    }


def test_every_listed_link_answers(api_client: APIClient, catalogue: dict) -> None:
    """No link of the root is itself a 404 once its parameters are filled in."""
    event = place_order_event()
    api_client.post("/api/events/", event, format="json")
    filled = {
        "{eventId}": event["eventId"],
        "{requestId}": "00000000-0000-4000-8000-000000000000",
        "{orderId}": "ORD-NONE",
        "{productId}": "PROD-A",
        "{customerId}": "CUST-1",
    }
    for name, url in api_client.get("/api/").json().items():
        for template, value in filled.items():
            url = url.replace(template, value)
        status = api_client.get(url).status_code
        # The events endpoint only takes POSTs; an unknown order or order request is a 404 of
        # the resource (its body says so), not of the route.
        expected = {"events": 405, "order": 404, "orderRequest": 404}.get(name, 200)
        assert status == expected, (name, url, status)


def test_the_root_needs_a_login_like_every_endpoint() -> None:
    assert APIClient().get("/api/").status_code == 401


def test_a_read_only_user_may_read_the_root_but_not_write_to_it() -> None:
    viewer = UserFactory(username="viewer")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=viewer).key}")
    assert client.get("/api/").status_code == 200
    assert client.post("/api/", {}, format="json").status_code == 403


def test_the_root_takes_no_writes(api_client: APIClient) -> None:
    assert api_client.post("/api/", {}, format="json").status_code == 405
