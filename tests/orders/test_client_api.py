"""``POST /api/orders/`` with an Idempotency-Key, bridged to the PlaceOrder Celery task."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any
from unittest import mock

import pytest
from django.contrib.auth.models import Permission
from django.urls import resolve
from django.utils import timezone
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from idempotency import outbox
from idempotency.http import PROBLEM_CONTENT_TYPE
from idempotency.models import IdempotencyKey, Outcome, ProcessedEvent
from orders import client_api
from orders.models import Order, Product
from orders.tasks import place_order
from tests.celery_app import mocked_celery_app
from tests.factories import UserFactory
from tests.services import in_thread, require_postgres

pytestmark = pytest.mark.django_db

ORDER = {"customerId": "CUST-1", "items": [{"productId": "PROD-A", "quantity": 2}]}
TIMEOUT = 20


@pytest.fixture
def worker() -> Iterator[mock.Mock]:
    """Messages the outbox publishes run at once, in-process, as a worker would run them."""

    def run(name: str, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        assert name == place_order.name
        return place_order.apply(args=args, kwargs=kwargs, throw=True)

    with mocked_celery_app() as app:
        app.send_task.side_effect = run
        yield app.send_task


def place(
    client: APIClient, body: Any = ORDER, key: str | None = "order-key-1", **extra: Any
) -> Any:
    headers = {} if key is None else {"Idempotency-Key": key}
    return client.post("/api/orders/", body, format="json", headers=headers, **extra)


def client_for(user: Any) -> APIClient:
    client = APIClient()
    token, _ = Token.objects.get_or_create(user=user)
    client.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")
    return client


def producer(username: str) -> Any:
    """A user who may place orders (orders.submit_event), like seed_demo's producer."""
    user = UserFactory(username=username)
    user.user_permissions.add(Permission.objects.get(codename="submit_event"))
    return user


def expected_request_id(user: Any, key: str) -> uuid.UUID:
    return uuid.uuid5(client_api.CLIENT_REQUEST_NAMESPACE, f"user:{user.pk}\n{key}")


def test_an_order_is_accepted_and_placed_after_the_commit(
    api_client: APIClient,
    user: Any,
    catalogue: dict[str, Any],
    worker: mock.Mock,
    django_capture_on_commit_callbacks: Any,
) -> None:
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        response = place(api_client)
    assert response.status_code == 202
    request_id = expected_request_id(user, "order-key-1")
    order_id = client_api.order_id_for(request_id)
    location = f"/api/orders/requests/{request_id}/"
    assert response.json() == {
        "requestId": str(request_id),
        "orderId": order_id,
        "status": "pending",
        "statusUrl": location,
    }
    assert response["Location"] == location
    assert not worker.called  # nothing is published before the commit
    assert not Order.objects.exists()

    for callback in callbacks:
        callback()
    (event,) = worker.call_args.kwargs.get("args") or worker.call_args.args[0]
    assert event["eventType"] == "PlaceOrder"
    assert event["eventId"] == str(request_id)
    assert event["orderId"] == order_id
    assert event["items"] == ORDER["items"]
    order = Order.objects.get()
    # One id ties the HTTP request, the task's inbox record and the order together.
    assert order.original_event_id == request_id
    assert order.order_id == order_id
    assert order.status == Order.Status.ACCEPTED
    assert ProcessedEvent.objects.get(consumer=place_order.name).event_id == str(request_id)


def test_a_retry_replays_the_202_and_places_no_second_order(
    api_client: APIClient,
    catalogue: dict[str, Any],
    worker: mock.Mock,
    django_capture_on_commit_callbacks: Any,
) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        first = place(api_client)
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        retry = place(api_client)
    assert retry.status_code == 202
    assert retry["Idempotent-Replayed"] == "true"
    assert retry.content == first.content
    assert retry["Location"] == first["Location"]
    assert not callbacks  # the replay published nothing
    assert worker.call_count == 1
    assert Order.objects.count() == 1
    assert Product.objects.get(product_id="PROD-A").stock == 98


def test_polling_the_status_url(
    api_client: APIClient,
    catalogue: dict[str, Any],
    worker: mock.Mock,
    django_capture_on_commit_callbacks: Any,
) -> None:
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        location = place(api_client)["Location"]
    pending = api_client.get(location)
    assert pending.status_code == 200
    assert pending.json()["status"] == "pending"
    assert pending.json()["order"] is None
    assert pending["Retry-After"] == "1"

    for callback in callbacks:
        callback()
    done = api_client.get(location)
    assert done.status_code == 200
    body = done.json()
    assert (body["status"], body["reason"]) == ("accepted", "")
    assert body["order"]["orderId"] == Order.objects.get().order_id
    assert body["order"]["items"] == [{"productId": "PROD-A", "quantity": 2, "unitPrice": "10.00"}]
    assert "Retry-After" not in done


def test_a_rejection_and_its_reason_are_polled(
    api_client: APIClient,
    catalogue: dict[str, Any],
    worker: mock.Mock,
    django_capture_on_commit_callbacks: Any,
) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        response = place(api_client, {**ORDER, "customerId": "CUST-404"})
    assert response.status_code == 202
    body = api_client.get(response["Location"]).json()
    assert (body["status"], body["reason"]) == ("rejected", "unknown customer CUST-404")


def test_a_rejection_without_an_order_row_is_polled_from_the_inbox(
    api_client: APIClient, user: Any, catalogue: dict[str, Any]
) -> None:
    request_id = expected_request_id(user, "k")
    ProcessedEvent.objects.create(
        consumer=place_order.name,
        event_id=str(request_id),
        outcome=Outcome.REJECTED,
        reason="order ORD-1 already exists",
    )
    body = api_client.get(f"/api/orders/requests/{request_id}/").json()
    assert (body["status"], body["reason"]) == ("rejected", "order ORD-1 already exists")


def test_an_unknown_request_is_a_404(api_client: APIClient) -> None:
    assert api_client.get(f"/api/orders/requests/{uuid.uuid4()}/").status_code == 404


def test_another_users_key_places_another_order_and_hides_the_pending_one(
    api_client: APIClient,
    catalogue: dict[str, Any],
    worker: mock.Mock,
    django_capture_on_commit_callbacks: Any,
) -> None:
    other = client_for(producer("other"))
    with django_capture_on_commit_callbacks(execute=False):
        mine = place(api_client)
    # Until the order exists, only its requester learns that it is pending.
    assert other.get(mine["Location"]).status_code == 404
    with django_capture_on_commit_callbacks(execute=True):
        theirs = place(other)  # the same key and body
    assert theirs.status_code == 202
    assert "Idempotent-Replayed" not in theirs
    assert theirs.json()["requestId"] != mine.json()["requestId"]
    assert Order.objects.count() == 1  # theirs; mine was never published in this test


def test_the_key_is_required(api_client: APIClient, worker: mock.Mock) -> None:
    response = place(api_client, key=None)
    assert response.status_code == 400
    assert response["Content-Type"] == PROBLEM_CONTENT_TYPE
    body = json.loads(response.content)
    assert body["type"].endswith(":idempotency-key-missing")
    assert body["status"] == 400
    assert not worker.called


@pytest.mark.parametrize("key", ["", "x" * 256, "no spaces"])
def test_a_malformed_key_is_a_400(api_client: APIClient, worker: mock.Mock, key: str) -> None:
    response = place(api_client, key=None, HTTP_IDEMPOTENCY_KEY=key)
    assert response.status_code == 400
    assert json.loads(response.content)["type"].endswith(":idempotency-key-invalid")
    assert not worker.called


def test_the_same_key_with_another_order_is_a_422(
    api_client: APIClient,
    catalogue: dict[str, Any],
    worker: mock.Mock,
    django_capture_on_commit_callbacks: Any,
) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        place(api_client)
        response = place(api_client, {**ORDER, "items": [{"productId": "PROD-A", "quantity": 3}]})
    assert response.status_code == 422
    assert response["Content-Type"] == PROBLEM_CONTENT_TYPE
    assert worker.call_count == 1
    assert Product.objects.get(product_id="PROD-A").stock == 98


def test_an_invalid_order_is_a_400_and_its_retry_gets_the_same_400(
    api_client: APIClient, worker: mock.Mock
) -> None:
    bad = {"customerId": "CUST-1", "items": []}
    first = place(api_client, bad)
    assert first.status_code == 400
    assert "items" in first.json()
    retry = place(api_client, bad)
    assert retry.status_code == 400
    assert retry["Idempotent-Replayed"] == "true"
    assert retry.content == first.content
    assert not worker.called


def test_an_order_request_from_a_request_body_that_is_not_json_is_fingerprinted(
    api_client: APIClient, worker: mock.Mock
) -> None:
    response = api_client.post(
        "/api/orders/",
        "customerId=CUST-1",
        content_type="application/x-www-form-urlencoded",
        headers={"Idempotency-Key": "form"},
    )
    assert response.status_code == 400  # no items: validated like JSON, and still keyed
    assert IdempotencyKey.objects.get().response_status == 400


def test_after_the_key_is_purged_a_retry_still_places_one_order(
    api_client: APIClient,
    catalogue: dict[str, Any],
    worker: mock.Mock,
    django_capture_on_commit_callbacks: Any,
) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        first = place(api_client)
    IdempotencyKey.objects.purge(before=timezone.now() + timedelta(seconds=1))
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        late = place(api_client)
    assert late.status_code == 202
    assert "Idempotent-Replayed" not in late  # the view ran again ...
    assert late.json() == first.json()  # ... and named the same request and order
    assert not callbacks  # without publishing the event again
    assert Order.objects.count() == 1
    assert Product.objects.get(product_id="PROD-A").stock == 98


def test_the_routes_do_not_clash(api_client: APIClient) -> None:
    request_id = uuid.uuid4()
    assert resolve(f"/api/orders/requests/{request_id}/").url_name == "order-request"
    assert resolve("/api/orders/requests/").url_name == "order-detail"  # an order id
    assert resolve("/api/orders/ORD-1/").url_name == "order-detail"
    assert resolve("/api/orders/").url_name == "orders"
    assert api_client.get("/api/orders/").status_code == 200  # the list is still there


def test_the_schema_documents_the_header_and_every_status(api_client: APIClient) -> None:
    schema = api_client.get("/api/schema/", {"format": "json"}).json()
    operation = schema["paths"]["/api/orders/"]["post"]
    (header,) = [p for p in operation["parameters"] if p["name"] == "Idempotency-Key"]
    assert (header["in"], header["required"]) == ("header", True)
    responses = operation["responses"]
    assert set(responses) >= {"202", "400", "409", "422"}
    assert "Location" in responses["202"]["headers"]
    assert "Idempotent-Replayed" in responses["202"]["headers"]
    assert "Retry-After" in responses["409"]["headers"]
    assert "Retry-After" in responses["503"]["headers"]
    assert {"403", "413"} <= set(responses)
    for status in ("400", "409", "413", "422", "503"):
        assert PROBLEM_CONTENT_TYPE in responses[status]["content"]
    assert "application/json" in responses["400"]["content"]  # field errors
    assert "get" in schema["paths"]["/api/orders/"]
    assert "get" in schema["paths"]["/api/orders/requests/{request_id}/"]


# --- Concurrency on PostgreSQL ---------------------------------------------------------------


@pytest.mark.services
@pytest.mark.django_db(transaction=True)
def test_two_identical_posts_at_once_make_one_order(
    user: Any, catalogue: dict[str, Any], worker: mock.Mock
) -> None:
    require_postgres()
    entered, release = threading.Event(), threading.Event()
    publish = outbox.enqueue

    def publish_after_a_pause(*args: Any, **kwargs: Any) -> Any:
        # Inside the first request's transaction, which holds the key's row lock.
        if not entered.is_set():
            entered.set()
            assert release.wait(TIMEOUT), "never released"
        return publish(*args, **kwargs)

    responses: dict[str, Any] = {}
    errors: list[BaseException] = []

    def send(name: str) -> Callable[[], None]:
        def run() -> None:
            responses[name] = place(client_for(user))

        return run

    with mock.patch("idempotency.outbox.enqueue", side_effect=publish_after_a_pause):
        first = in_thread(send("first"), errors)
        assert entered.wait(TIMEOUT), f"the first request never reached its view: {errors}"
        second = in_thread(send("second"), errors)
        second.join(TIMEOUT)
        assert not second.is_alive(), "the retry waited for the request in flight"
        assert first.is_alive()
        release.set()
        first.join(TIMEOUT)
        assert not first.is_alive()
    assert not errors, errors

    assert responses["first"].status_code == 202
    assert responses["second"].status_code == 409
    assert responses["second"]["Retry-After"] == "1"
    retry = place(client_for(user))
    assert retry["Idempotent-Replayed"] == "true"
    assert retry.content == responses["first"].content
    assert worker.call_count == 1
    assert Order.objects.count() == 1
    assert Order.objects.get().status == Order.Status.ACCEPTED
    assert Product.objects.get(product_id="PROD-A").stock == 98
