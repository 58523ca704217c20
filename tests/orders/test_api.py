"""The HTTP surface: validation, authentication, dispatch after commit, read endpoints."""

from __future__ import annotations

from typing import Any
from unittest import mock

import pytest
from django.contrib.auth.models import Permission
from django.utils import timezone
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from idempotency.models import DeadLetter, OutboxMessage
from orders.models import Order
from tests.celery_app import mocked_celery_app
from tests.factories import (
    LedgerEntryFactory,
    OrderFactory,
    OrderItemFactory,
    ProcessedEventFactory,
    ProductFactory,
    UserFactory,
    debit_account_event,
    order_shipped_event,
    payment_received_event,
    place_order_event,
)

pytestmark = pytest.mark.django_db


@pytest.fixture
def published() -> Any:
    """What reaches the broker: the outbox relay's ``send_task`` calls."""
    with mocked_celery_app() as app:
        yield app.send_task


def test_a_valid_event_is_stored_then_published_after_commit(
    api_client: APIClient, published: mock.Mock, django_capture_on_commit_callbacks: Any
) -> None:
    event = place_order_event()
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        response = api_client.post("/api/events/", event, format="json")
    assert response.status_code == 202
    assert response.json() == {"eventId": event["eventId"], "status": "accepted"}
    stored = OutboxMessage.objects.get()
    assert (stored.task_name, stored.event_id) == ("orders.tasks.place_order", event["eventId"])
    assert not published.called  # nothing leaves before the commit
    for callback in callbacks:
        callback()
    assert published.call_args.args == ("orders.tasks.place_order",)
    (sent,) = published.call_args.kwargs["args"]
    assert sent["eventId"] == event["eventId"]
    assert sent["items"] == event["items"]
    stored.refresh_from_db()
    assert stored.published_at is not None


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


@pytest.fixture
def viewer_client(db: Any) -> APIClient:
    viewer = UserFactory(username="viewer")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=viewer).key}")
    return client


@pytest.fixture
def producer_client(db: Any) -> APIClient:
    producer = UserFactory(username="producer-2")
    producer.user_permissions.add(Permission.objects.get(codename="submit_event"))
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=producer).key}")
    return client


@pytest.fixture
def published_all() -> Any:
    """Every event put in the outbox for publication after the commit (checked above)."""
    with mock.patch("idempotency.outbox.enqueue") as enqueue:
        yield enqueue


ROUTES = {
    "PlaceOrder": "place_order",
    "PaymentReceived": "payment_received",
    "DebitAccount": "debit_account",
    "OrderShipped": "ship_order",
}
EVERY_TYPE = [
    place_order_event(),
    payment_received_event(),
    debit_account_event(),
    order_shipped_event(),
]


@pytest.mark.parametrize("event", EVERY_TYPE, ids=lambda e: e["eventType"])
def test_every_event_type_is_accepted_and_routed(
    producer_client: APIClient, published_all: mock.Mock, event: dict[str, Any]
) -> None:
    response = producer_client.post("/api/events/", event, format="json")
    assert response.status_code == 202, response.json()
    task, (sent,) = published_all.call_args.args
    assert sent == event
    assert task.name == f"orders.tasks.{ROUTES[event['eventType']]}"


def test_a_reader_without_the_permission_gets_403(
    viewer_client: APIClient, published_all: mock.Mock
) -> None:
    response = viewer_client.post("/api/events/", place_order_event(), format="json")
    assert response.status_code == 403
    assert not published_all.called
    assert viewer_client.get("/api/products/PROD-404/").status_code == 404  # reading is allowed


def test_a_batch_is_accepted_whole(producer_client: APIClient, published_all: mock.Mock) -> None:
    events = [place_order_event() for _ in range(3)] + [debit_account_event()]
    response = producer_client.post("/api/events/", events, format="json")
    assert response.status_code == 202
    assert [r["eventId"] for r in response.json()] == [e["eventId"] for e in events]
    assert published_all.call_count == 4


def test_a_batch_with_one_bad_event_is_refused_whole(
    producer_client: APIClient, published_all: mock.Mock
) -> None:
    events = [place_order_event(), debit_account_event(amount="-1"), place_order_event()]
    response = producer_client.post("/api/events/", events, format="json")
    assert response.status_code == 400
    assert list(response.json()["events"]) == ["1"]
    assert "amount" in response.json()["events"]["1"]
    assert not published_all.called


@pytest.mark.parametrize("size", [0, 501])
def test_batch_sizes(producer_client: APIClient, published_all: mock.Mock, size: int) -> None:
    events = [debit_account_event() for _ in range(size)]
    response = producer_client.post("/api/events/", events, format="json")
    assert response.status_code == 400
    assert not published_all.called


def test_the_largest_batch_is_accepted(
    producer_client: APIClient, published_all: mock.Mock
) -> None:
    events = [debit_account_event() for _ in range(500)]
    assert producer_client.post("/api/events/", events, format="json").status_code == 202
    assert published_all.call_count == 500


def test_a_body_over_1_mib_is_a_413(producer_client: APIClient, published_all: mock.Mock) -> None:
    event = debit_account_event(reason="x" * (1024 * 1024))
    response = producer_client.post("/api/events/", event, format="json")
    assert response.status_code == 413
    assert not published_all.called


@pytest.mark.parametrize(
    ("event", "field"),
    [
        (payment_received_event(amount="0"), "amount"),
        (payment_received_event(amount="-5"), "amount"),
        (payment_received_event(amount="ten"), "amount"),
        (payment_received_event(amount="1.001"), "amount"),
        (payment_received_event(currency="usd"), "currency"),
        (payment_received_event(paymentId=None), "paymentId"),
        (payment_received_event(paymentID="PAY-1"), "paymentID"),
        (debit_account_event(amount=0), "amount"),
        (debit_account_event(reason=""), "reason"),
        (debit_account_event(customerId=["CUST-1"]), "customerId"),
        (order_shipped_event(trackingNumber=""), "trackingNumber"),
        (place_order_event(items=[{"productId": "P", "quantity": 1}] * 101), "items"),
        (place_order_event(items=[{"productId": "P", "quantity": -1}]), "items"),
        (place_order_event(eventId=42), "eventId"),
        # Each field takes only its own JSON type, and ids are visible ASCII without spaces
        # (the schema says so; a value it forbids is refused, see test_schema.py).
        (place_order_event(orderId=12), "orderId"),
        (place_order_event(orderId=" ORD-1"), "orderId"),
        (place_order_event(orderId="ORD\x001"), "orderId"),
        (place_order_event(orderId="O" * 65), "orderId"),
        (place_order_event(items=[{"productId": "P", "quantity": "2"}]), "items"),
        (place_order_event(items=[{"productId": "P", "quantity": 2.0}]), "items"),
        (place_order_event(items=[{"productId": "P", "quantity": True}]), "items"),
        (place_order_event(items=[]), "items"),
        (payment_received_event(amount=20), "amount"),
        (payment_received_event(amount="20.00\n"), "amount"),
        (payment_received_event(amount="1000000.01"), "amount"),
        (payment_received_event(amount="0.00"), "amount"),
        (payment_received_event(currency="USD\n"), "currency"),
        (debit_account_event(reason=7), "reason"),
        (debit_account_event(reason="fee\x00"), "reason"),
        (order_shipped_event(trackingNumber=0), "trackingNumber"),
    ],
)
def test_field_errors_of_every_type(
    producer_client: APIClient, published_all: mock.Mock, event: dict[str, Any], field: str
) -> None:
    response = producer_client.post("/api/events/", event, format="json")
    assert response.status_code == 400
    assert field in response.json()
    assert not published_all.called


def test_malformed_json_is_a_400(producer_client: APIClient) -> None:
    response = producer_client.post("/api/events/", "{not json", content_type="application/json")
    assert response.status_code == 400


def test_an_event_never_posted_is_a_404(api_client: APIClient) -> None:
    response = api_client.get("/api/events/e-never/")
    assert response.status_code == 404
    assert "never posted" in response.json()["detail"]


def test_an_event_in_the_outbox_is_pending(api_client: APIClient) -> None:
    OutboxMessage.objects.create(task_name="orders.tasks.place_order", event_id="e-waiting")
    assert api_client.get("/api/events/e-waiting/").json() == {
        "eventId": "e-waiting",
        "status": "pending",
        "consumers": [],
    }


def test_a_dead_lettered_event_says_so_with_the_reason(api_client: APIClient) -> None:
    letter = DeadLetter.objects.create(
        reason=DeadLetter.Reason.FAILED,
        task_name="orders.tasks.payment_received",
        event_id="e-dead",
        args=[{"eventId": "e-dead"}],
        exception="OrderNotYetKnown: no order ORD-404 yet\nsecond line",
    )
    response = api_client.get("/api/events/e-dead/")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "dead_lettered"
    [consumer] = body["consumers"]
    assert consumer["consumer"] == "orders.tasks.payment_received"
    assert consumer["status"] == "dead_lettered"
    assert consumer["reason"] == "failed for good: OrderNotYetKnown: no order ORD-404 yet"
    assert consumer["deadLetteredAt"] is not None
    assert consumer["processedAt"] is None

    # Re-driven: waiting for a worker again, no longer dead.
    DeadLetter.objects.filter(pk=letter.pk).update(redriven_at=timezone.now())
    assert api_client.get("/api/events/e-dead/").json()["status"] == "pending"

    # Processed after the re-drive: the inbox record is the consumer's outcome.
    ProcessedEventFactory(event_id="e-dead", consumer="orders.tasks.payment_received")
    body = api_client.get("/api/events/e-dead/").json()
    assert body["status"] == "processed"
    assert [c["status"] for c in body["consumers"]] == ["processed"]


def test_a_dead_letter_of_one_consumer_outranks_another_consumers_success(
    api_client: APIClient,
) -> None:
    ProcessedEventFactory(event_id="e-split", consumer="a")
    DeadLetter.objects.create(reason=DeadLetter.Reason.FAILED, task_name="b", event_id="e-split")
    body = api_client.get("/api/events/e-split/").json()
    assert body["status"] == "dead_lettered"
    assert [(c["consumer"], c["status"]) for c in body["consumers"]] == [
        ("a", "processed"),
        ("b", "dead_lettered"),
    ]


def test_event_status_across_consumers(api_client: APIClient) -> None:
    event_id = "e-status"
    ProcessedEventFactory(event_id=event_id, consumer="a")
    ProcessedEventFactory(event_id=event_id, consumer="b", duplicate_count=2)
    body = api_client.get(f"/api/events/{event_id}/").json()
    assert body["status"] == "duplicate-discarded"
    assert [(c["consumer"], c["status"]) for c in body["consumers"]] == [
        ("a", "processed"),
        ("b", "duplicate-discarded"),
    ]
    ProcessedEventFactory(event_id=event_id, consumer="c", outcome="rejected", reason="no")
    assert api_client.get(f"/api/events/{event_id}/").json()["status"] == "rejected"
    ProcessedEventFactory(event_id=event_id, consumer="d", mismatch_fingerprint="f" * 64)
    assert api_client.get(f"/api/events/{event_id}/").json()["status"] == "mismatch"


def test_orders_of_a_customer_are_listed_and_paginated(api_client: APIClient) -> None:
    for _ in range(3):
        OrderFactory(requested_customer_id="CUST-9")
    OrderFactory(requested_customer_id="CUST-8")
    body = api_client.get("/api/orders/", {"customerId": "CUST-9"}).json()
    assert body["count"] == 3
    assert {o["customerId"] for o in body["results"]} == {"CUST-9"}
    assert api_client.get("/api/orders/").json()["count"] == 4


def test_read_a_customer_with_its_ledger(api_client: APIClient) -> None:
    entry = LedgerEntryFactory(customer__customer_id="CUST-7", customer__balance="90.00")
    body = api_client.get("/api/customers/CUST-7/").json()
    assert body["customerId"] == "CUST-7"
    assert body["balance"] == "90.00"
    assert body["ledger"][0]["originalEventId"] == str(entry.original_event_id)


@pytest.mark.parametrize(
    "url", ["/api/orders/", "/api/events/x/", "/api/customers/C/", "/api/products/P/"]
)
def test_every_read_endpoint_needs_authentication(db: Any, url: str) -> None:
    assert APIClient().get(url).status_code == 401


def test_the_schema_describes_every_event_type(api_client: APIClient) -> None:
    response = api_client.get("/api/schema/", {"format": "json"})
    assert response.status_code == 200
    schema = response.json()
    for name in ("PlaceOrder", "PaymentReceived", "DebitAccount", "OrderShipped"):
        assert name in schema["components"]["schemas"]
        assert name in schema["paths"]["/api/events/"]["post"]["description"]
