"""What every endpoint answers alike: permissions, bad input, oversized bodies, outages."""

from __future__ import annotations

import io
import itertools
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any
from unittest import mock

import pytest
from django.contrib.auth.models import AnonymousUser, Permission
from django.db import InterfaceError, OperationalError
from django.test import RequestFactory
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from idempotency.http import PROBLEM_CONTENT_TYPE
from idempotency.models import IdempotencyKey, OutboxMessage
from orders import views
from orders.parsers import MAX_DEPTH
from project import middleware
from tests.celery_app import mocked_celery_app
from tests.factories import (
    CustomerFactory,
    OrderFactory,
    ProcessedEventFactory,
    ProductFactory,
    UserFactory,
    debit_account_event,
    order_shipped_event,
    payment_received_event,
    place_order_event,
)
from tests.services import ROOT

pytestmark = pytest.mark.django_db

LIMIT = 1024 * 1024
ORDER = {"customerId": "CUST-1", "items": [{"productId": "PROD-A", "quantity": 1}]}


def client(role: str) -> APIClient:
    """A client of one of seed_demo's roles, or anonymous."""
    api = APIClient()
    if role == "anonymous":
        return api
    user = UserFactory(username=f"{role}-{uuid.uuid4().hex[:6]}")
    if role == "producer":
        user.user_permissions.add(Permission.objects.get(codename="submit_event"))
    if role == "admin":
        user.is_superuser = user.is_staff = True
        user.save()
    api.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=user).key}")
    return api


@pytest.fixture
def published() -> Iterator[mock.Mock]:
    with mocked_celery_app() as app:
        yield app.send_task


def problem(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.content
    assert response["Content-Type"] == PROBLEM_CONTENT_TYPE
    body: dict[str, Any] = json.loads(response.content)
    assert body["status"] == status
    assert body["detail"]
    return body


# --- Who may do what -------------------------------------------------------------------------

REQUEST_ID = "6b114c3b-0e01-4b72-8f20-3c8529c75830"
#: Every read endpoint, each naming a row the test creates (the_rows_read).
READS = [
    "/api/events/e-1/",
    "/api/orders/",
    f"/api/orders/requests/{REQUEST_ID}/",
    "/api/orders/ORD-1/",
    "/api/products/PROD-A/",
    "/api/customers/CUST-1/",
]
#: The same endpoints naming rows that do not exist: the only reads that answer 404.
MISSING = [
    "/api/events/e-404/",
    "/api/orders/requests/0c7e5ee4-4c61-4d6b-9d5a-6c1b1f0a0404/",
    "/api/orders/ORD-404/",
    "/api/products/PROD-404/",
    "/api/customers/CUST-404/",
]
#: The write endpoints and a valid body for each.
WRITES = {"/api/events/": "event", "/api/orders/": "order"}
UNSAFE = ["post", "put", "patch", "delete"]
ROLES = ["anonymous", "viewer", "producer", "admin"]


def send(api: APIClient, method: str, url: str) -> Any:
    if url == "/api/events/":
        body: Any = place_order_event()
    elif url == "/api/orders/":
        body = ORDER
    else:
        body = {}
    headers = {"Idempotency-Key": uuid.uuid4().hex}
    return getattr(api, method)(url, body, format="json", headers=headers)


def the_rows_read() -> None:
    """The rows READS name: an order (placed by request REQUEST_ID) for CUST-1, a product, and
    an inbox record of event e-1."""
    # The order's customer is CUST-1 itself: a factory-made one could be named CUST-1 too,
    # depending on which tests ran before (the factory's sequence).
    OrderFactory(
        order_id="ORD-1",
        customer=CustomerFactory(customer_id="CUST-1"),
        original_event_id=uuid.UUID(REQUEST_ID),
    )
    ProductFactory(product_id="PROD-A")
    ProcessedEventFactory(consumer="orders.tasks.place_order", event_id="e-1")


@pytest.mark.parametrize(
    ("role", "method", "url"),
    [
        *itertools.product(ROLES, ["get"], [*READS, *WRITES, *MISSING]),
        *itertools.product(ROLES, UNSAFE, [*READS, *WRITES]),
    ],
)
def test_the_permission_matrix(published: mock.Mock, role: str, method: str, url: str) -> None:
    the_rows_read()
    response = send(client(role), method, url)
    status = response.status_code
    writer = role in ("producer", "admin")
    if role == "anonymous":
        expected = {401}
    elif method == "get" and url == "/api/events/":
        expected = {405} if writer else {403}  # the events endpoint only takes writes
    elif method == "get":
        # Reading is open to every signed-in user: a row that exists is a 200 for each role.
        expected = {404} if url in MISSING else {200}
    elif not writer:
        expected = {403}  # a read-only user may write nowhere
    elif method == "post" and url in WRITES:
        expected = {202}
    else:
        expected = {405}
    assert status in expected, (role, method, url, status, response.content[:300])
    if status != 202:
        assert not OutboxMessage.objects.exists()
        assert not IdempotencyKey.objects.filter(state="completed", response_status=202).exists()


def test_the_read_only_viewer_cannot_place_an_order(published: mock.Mock) -> None:
    response = client("viewer").post(
        "/api/orders/", ORDER, format="json", headers={"Idempotency-Key": "k-1"}
    )
    assert response.status_code == 403
    assert "orders.submit_event" in response.json()["detail"]
    assert not OutboxMessage.objects.exists()
    assert not IdempotencyKey.objects.exists()  # refused before the key was claimed


# --- Bad input is a 4xx, on every endpoint ---------------------------------------------------

BAD_VALUES: list[Any] = [
    None,
    True,
    0,
    -1,
    10**30,
    -(10**30),
    1.5,
    1e308,
    "",
    " ",
    "\x00",
    "a\x00b",
    "x" * 5000,
    "\u2603" * 70,
    "2023-13-45T99:99:99Z",
    {},
    {"eventType": {"nested": [1, {"deeper": None}]}},
    [],
    [["x"]],
    [{}],
]
EVENTS = [
    place_order_event(),
    payment_received_event(),
    debit_account_event(),
    order_shipped_event(),
]


def variants(event: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The event with each field, in turn, replaced by each bad value, or missing."""
    paths: list[tuple[str, ...]] = [(name,) for name in event]
    if "items" in event:
        paths += [("items", "0", "productId"), ("items", "0", "quantity"), ("items", "0")]
    for path in paths:
        for value in [*BAD_VALUES, "missing"]:
            changed = json.loads(json.dumps(event))
            target: Any = changed
            for part in path[:-1]:
                target = target[int(part)] if isinstance(target, list) else target[part]
            last: Any = int(path[-1]) if isinstance(target, list) else path[-1]
            if value == "missing":
                del target[last]
            else:
                target[last] = value
            yield changed


def assert_no_5xx(response: Any, what: Any) -> None:
    assert response.status_code < 500, (what, response.status_code, response.content[:500])


def test_fuzz_every_field_of_every_event_alone_and_in_a_batch(published: mock.Mock) -> None:
    producer = client("producer")
    for event in EVENTS:
        for bad in variants(event):
            for body in (bad, [place_order_event(), bad]):
                response = producer.post("/api/events/", body, format="json")
                assert_no_5xx(response, body)
                # A value it cannot take is refused, never accepted as something else.
                if response.status_code == 202:
                    assert isinstance(body, dict) or body[1] == bad


def test_an_event_type_that_is_an_object_or_a_list_is_a_field_error(
    published: mock.Mock,
) -> None:
    producer = client("producer")
    for value in ({}, [], ["PlaceOrder"], {"PlaceOrder": 1}):
        alone = producer.post("/api/events/", place_order_event(eventType=value), format="json")
        assert alone.status_code == 400
        assert "must be a string" in alone.json()["eventType"][0]
        batch = producer.post(
            "/api/events/", [place_order_event(), place_order_event(eventType=value)], format="json"
        )
        assert batch.status_code == 400
        assert list(batch.json()["events"]) == ["1"]
    assert not OutboxMessage.objects.exists()


def test_fuzz_every_field_of_an_order_request(published: mock.Mock) -> None:
    producer = client("producer")
    CustomerFactory(customer_id="CUST-1")
    ProductFactory(product_id="PROD-A")
    for index, bad in enumerate(variants(ORDER)):
        response = producer.post(
            "/api/orders/", bad, format="json", headers={"Idempotency-Key": f"fuzz-{index}"}
        )
        assert_no_5xx(response, bad)
    for key in ["\x00", "a\x00b", "x" * 10_000, "\u2603", " ", '""', "a b"]:
        response = producer.post(
            "/api/orders/", ORDER, format="json", headers={"Idempotency-Key": key}
        )
        assert response.status_code == 400, key


RAW_BODIES = [
    b"",
    b"{",
    b"\xff\xfe\x00",
    b"1e999",
    b"NaN",
    b'"\\u0000"',
    b'{"\\u0000": 1}',
    b'{"eventType": "PlaceOrder", "eventId": "\\u0000"}',
    b"[" * 100_000 + b"]" * 100_000,
    json.dumps(json.loads("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1))).encode(),
    b'{"customerId": "CUST-1", "items": [{"productId": "PROD-A", "quantity": 1e999}]}',
    b'{"customerId": "CUST-1", "items": [{"productId": "PROD-A", "quantity": 1'
    + b"0" * 5000
    + b"}]}",
]


@pytest.mark.parametrize("url", list(WRITES))
@pytest.mark.parametrize(
    "content_type",
    ["application/json", "application/json; charset=utf-16", "text/plain", "multipart/form-data"],
)
def test_fuzz_raw_bodies(published: mock.Mock, url: str, content_type: str) -> None:
    producer = client("producer")
    for index, body in enumerate(RAW_BODIES):
        response = producer.generic(
            "POST", url, body, content_type, headers={"Idempotency-Key": f"raw-{index}"}
        )
        assert_no_5xx(response, body[:80])
    assert not OutboxMessage.objects.exists()


def test_json_nested_too_deeply_is_a_400(published: mock.Mock) -> None:
    producer = client("producer")
    for depth in (MAX_DEPTH + 1, 100_000):
        body = b"[" * depth + b"]" * depth
        response = producer.generic("POST", "/api/events/", body, "application/json")
        assert response.status_code == 400
        assert "nested deeper" in response.json()["detail"]


ODD_SEGMENTS = [
    "%00",
    "a%00b",
    "x" * 10_000,
    "1" + "0" * 30,
    "%ff",
    "%F0%9F%92%A9",
    "..%2F..%2F",
    "%20",
    "'; DROP TABLE orders_order; --",
]


def test_fuzz_paths_and_query_parameters(published: mock.Mock) -> None:
    viewer = client("admin")
    OrderFactory(order_id="ORD-1")
    templates = [
        "/api/events/{}/",
        "/api/orders/{}/",
        "/api/orders/requests/{}/",
        "/api/products/{}/",
        "/api/customers/{}/",
        "/api/orders/?customerId={}",
        "/api/orders/?page={}",
        "/api/orders/?customerId=CUST-1&page={}",
        "/api/schema/?format={}",
        "/admin/orders/order/?q={}",
        "/admin/idempotency/idempotencykey/?q={}",
        "/admin/orders/order/{}/change/",
    ]
    admin = UserFactory(username="fuzz-admin", is_superuser=True, is_staff=True)
    browser = APIClient()
    browser.force_login(admin)
    for template, segment in itertools.product(templates, ODD_SEGMENTS):
        url = template.format(segment)
        api = browser if url.startswith("/admin/") else viewer
        response = api.get(url)
        assert_no_5xx(response, url)
        if "%00" in segment:
            assert problem(response, 400)["type"].endswith(":bad-request")


def test_a_nul_in_the_path_or_the_query_is_a_400_with_a_clear_message(
    published: mock.Mock,
) -> None:
    api = client("admin")
    for url in ["/api/events/a%00b/", "/api/orders/%00/", "/api/orders/?customerId=%00"]:
        body = problem(api.get(url), 400)
        assert "NUL" in body["detail"]


# --- One body limit for every endpoint -------------------------------------------------------


@pytest.mark.parametrize("url", [*WRITES, *READS, "/admin/login/"])
@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH"])
def test_a_body_over_the_limit_is_a_413_on_every_endpoint(
    published: mock.Mock, url: str, method: str
) -> None:
    body = b'{"reason": "' + b"x" * LIMIT + b'"}'
    response = client("producer").generic(
        method, url, body, "application/json", headers={"Idempotency-Key": "big"}
    )
    assert problem(response, 413)["type"].endswith(":payload-too-large")
    assert not IdempotencyKey.objects.exists()
    assert not OutboxMessage.objects.exists()


def test_a_30_mb_order_request_is_refused_before_it_is_read(published: mock.Mock) -> None:
    body = json.dumps({**ORDER, "padding": "x" * (30 * 1024 * 1024)}).encode()
    with mock.patch("orders.parsers.JSONParser.parse") as parse:
        response = client("producer").generic(
            "POST", "/api/orders/", body, "application/json", headers={"Idempotency-Key": "k"}
        )
    problem(response, 413)
    assert not parse.called  # neither parsed nor fingerprinted
    assert not IdempotencyKey.objects.exists()


def test_a_body_at_the_limit_is_still_read() -> None:
    body = b"x" * LIMIT
    request = RequestFactory().generic("POST", "/", body, "application/octet-stream")
    seen: list[bytes] = []
    middleware.RequestGuardMiddleware(lambda r: seen.append(r.body) or mock.Mock())(request)
    assert seen == [body]


def test_a_body_without_a_declared_length_is_cut_off_at_the_limit() -> None:
    # As a chunked request reaches an ASGI server: no Content-Length, the whole body behind.
    request = RequestFactory().generic("POST", "/", b"", "application/json")
    request.META.pop("CONTENT_LENGTH", None)
    request._stream = io.BytesIO(b"[" + b"1," * LIMIT + b"1]")  # type: ignore[attr-defined]
    guard = middleware.RequestGuardMiddleware(lambda r: r.read())
    with pytest.raises(middleware.RequestDataTooBig):
        guard(request)
    response = guard.process_exception(request, middleware.RequestDataTooBig("over"))
    assert response is not None
    problem(response, 413)


def test_an_invalid_content_length_is_a_400() -> None:
    request = RequestFactory().generic("POST", "/", b"{}", "application/json")
    request.META["CONTENT_LENGTH"] = "-5"
    problem(middleware.RequestGuardMiddleware(lambda r: mock.Mock())(request), 400)


# --- A database outage is a 503 with Retry-After ---------------------------------------------


@pytest.mark.parametrize(
    "error", [OperationalError("connection refused"), InterfaceError("connection already closed")]
)
def test_a_database_error_in_a_view_is_a_503_with_retry_after(
    published: mock.Mock, error: Exception
) -> None:
    api = client("producer")
    with mock.patch.object(views.OrderDetailView, "get_object", side_effect=error):
        response = api.get("/api/orders/ORD-1/")
    body = problem(response, 503)
    assert body["type"].endswith(":service-unavailable")
    assert int(response["Retry-After"]) >= 1


def test_other_errors_are_not_taken_for_an_outage() -> None:
    assert not middleware.database_unavailable(ValueError("bad"))
    assert not middleware.database_unavailable(None)
    request = RequestFactory().get("/")
    request.user = AnonymousUser()
    assert (
        middleware.RequestGuardMiddleware(mock.Mock()).process_exception(request, ValueError("bad"))
        is None
    )


def test_handler500_answers_503_for_an_outage_outside_a_view() -> None:
    request = RequestFactory().get("/")
    try:
        raise OperationalError("the session could not be saved")
    except OperationalError:
        response = middleware.server_error(request)
    problem(response, 503)
    try:
        raise ValueError("a bug")
    except ValueError:
        assert middleware.server_error(request).status_code == 500


# --- Settings of the web process ---------------------------------------------------------------


def settings_of(*argv: str, **env: str) -> dict[str, Any]:
    """DEBUG and the database settings as a fresh process with *env* sees them."""
    code = (
        "import json, django; django.setup(); from django.conf import settings as s; "
        "d = s.DATABASES['default']; "
        "print(json.dumps({'DEBUG': s.DEBUG, 'CONN_MAX_AGE': d['CONN_MAX_AGE'], "
        "'pool': d.get('OPTIONS', {}).get('pool')}))"
    )
    base = {k: v for k, v in os.environ.items() if k not in {"DJANGO_DEBUG", "DJANGO_WEB_PROCESS"}}
    result = subprocess.run(
        [sys.executable, "-c", code, *argv],
        cwd=ROOT,
        env={**base, "DJANGO_SETTINGS_MODULE": "project.settings", **env},
        capture_output=True,
        text=True,
        check=True,
    )
    settings: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return settings


def test_debug_is_off_unless_asked_for() -> None:
    assert settings_of()["DEBUG"] is False
    assert settings_of(DJANGO_DEBUG="1")["DEBUG"] is True


def test_on_postgresql_the_web_process_pools_and_the_worker_keeps_its_connection() -> None:
    url = "postgres://postgres@127.0.0.1:5432/unused"
    web = settings_of(DATABASE_URL=url, DJANGO_WEB_PROCESS="1", WEB_THREADS="6")
    assert web["CONN_MAX_AGE"] == 0
    assert web["pool"]["max_size"] == 6  # one connection per thread, no more
    # runserver starts a thread per request: it must not keep a connection per thread either.
    runserver = settings_of("runserver", DATABASE_URL=url)
    assert (runserver["CONN_MAX_AGE"], runserver["pool"]["max_size"]) == (0, 4)
    worker = settings_of(DATABASE_URL=url)
    assert worker["pool"] is None
    assert worker["CONN_MAX_AGE"] == 600  # what the worker's connection reuse relies on
