"""Requests an outsider sends on purpose: what the front door must answer with a 4xx."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any
from unittest import mock

import pytest
from rest_framework.test import APIClient

from idempotency.models import IdempotencyKey, OutboxMessage
from tests.celery_app import mocked_celery_app
from tests.factories import CustomerFactory, ProductFactory, UserFactory, place_order_event
from tests.orders.test_web import ORDER, client, problem

pytestmark = pytest.mark.django_db

WRITES = ["/api/orders/", "/api/events/"]


@pytest.fixture
def published() -> Iterator[mock.Mock]:
    with mocked_celery_app() as app:
        yield app.send_task


def body_for(url: str) -> bytes:
    return json.dumps(ORDER if url == "/api/orders/" else place_order_event()).encode()


@pytest.mark.parametrize("url", WRITES)
@pytest.mark.parametrize(
    "escape",
    [
        '"x": "\\ud800"',  # an unknown field: no serializer ever looks at it
        '"\\udfff": 1',  # a key
        '"x": ["a", {"y": "b\\udc00c"}]',  # deep down
    ],
)
def test_a_lone_surrogate_anywhere_in_the_body_is_a_400(
    published: mock.Mock, url: str, escape: str
) -> None:
    body = b"{" + escape.encode() + b", " + body_for(url)[1:]
    response = client("producer").generic(
        "POST", url, body, "application/json", headers={"Idempotency-Key": "surrogate"}
    )
    assert response.status_code == 400, response.content
    assert "surrogate" in response.json()["detail"]
    assert not OutboxMessage.objects.exists()


def test_a_surrogate_pair_is_still_one_character(published: mock.Mock) -> None:
    """The check refuses only lone halves: an escaped emoji is a valid string."""
    CustomerFactory(customer_id="CUST-1")
    ProductFactory(product_id="PROD-A")
    body = b'{"note": "\\ud83d\\ude00", ' + body_for("/api/orders/")[1:]
    response = client("producer").generic(
        "POST", "/api/orders/", body, "application/json", headers={"Idempotency-Key": "pair"}
    )
    assert response.status_code == 202, response.content


@pytest.mark.parametrize("url", [*WRITES, "/admin/login/"])
@pytest.mark.parametrize("charset", ["zlib", "bz2", "rot13", "base64", "hex", "uu", "quopri"])
def test_a_charset_that_is_not_a_text_encoding_is_a_415(
    published: mock.Mock, url: str, charset: str
) -> None:
    media = "application/json" if url in WRITES else "application/x-www-form-urlencoded"
    response = client("producer").generic(
        "POST",
        url,
        body_for(url),
        f"{media}; charset={charset}",
        headers={"Idempotency-Key": f"cs-{charset}"},
    )
    assert problem(response, 415)["type"].endswith(":unsupported-charset")
    assert not OutboxMessage.objects.exists()
    assert not IdempotencyKey.objects.exists()


@pytest.mark.parametrize("charset", ["utf-8", "UTF8", "latin-1", "no-such-charset"])
def test_text_encodings_and_unknown_charsets_are_still_parsed(
    published: mock.Mock, charset: str
) -> None:
    response = client("producer").generic(
        "POST", "/api/events/", body_for("/api/events/"), f"application/json; charset={charset}"
    )
    assert response.status_code == 202, response.content


@pytest.mark.parametrize("length", ["\xb2", "1\xb2", "\u0661", "\uff11", "-1", "1 "])
def test_a_content_length_that_is_not_ascii_digits_is_a_400(
    published: mock.Mock, length: str
) -> None:
    # Superscript two passes str.isdigit() and then fails int(); Arabic-Indic and fullwidth
    # digits pass both, and are no Content-Length either.
    response = client("producer").generic(
        "POST", "/api/events/", b"{}", "application/json", CONTENT_LENGTH=length
    )
    assert problem(response, 400)["type"].endswith(":bad-request")


HEADERS_WITH_NUL = {
    "HTTP_AUTHORIZATION": "Token \x00abc",
    "HTTP_COOKIE": "sessionid=abcdefgh\x00ijklmnop",
    "HTTP_IDEMPOTENCY_KEY": "a\x00b",
    "HTTP_X_ANYTHING": "\x00",
    "CONTENT_TYPE": "application/json\x00",
}


@pytest.mark.parametrize("header", list(HEADERS_WITH_NUL))
@pytest.mark.parametrize(
    ("method", "url"),
    [
        ("get", "/api/orders/"),
        ("get", "/admin/"),
        ("get", "/admin/login/"),
        ("post", "/api/orders/"),
        ("post", "/api/events/"),
    ],
)
def test_a_nul_in_any_header_is_a_400(
    published: mock.Mock, header: str, method: str, url: str
) -> None:
    """The token and the session key are looked up in the database: PostgreSQL refuses NUL."""
    UserFactory(username="someone")
    value = HEADERS_WITH_NUL[header]
    if header == "CONTENT_TYPE":
        response = APIClient().generic(method.upper(), url, content_type=value)
    else:
        response = APIClient().generic(method.upper(), url, **{header: value})
    body: dict[str, Any] = problem(response, 400)
    assert "NUL" in body["detail"]
