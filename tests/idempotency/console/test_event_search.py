"""Finding an event: the search page, where it is linked from, and what it finds."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth.models import Permission
from django.test import Client
from django.utils import timezone

from idempotency.admin_base import event_url
from idempotency.models import IdempotencyKey, ProcessedEvent
from tests.factories import OrderFactory, UserFactory

pytestmark = pytest.mark.django_db

SEARCH = "/admin/idempotency/processedevent/event/"


@pytest.fixture
def root() -> Client:
    client = Client()
    client.force_login(UserFactory(username="root", is_staff=True, is_superuser=True))
    return client


def clerk(*permissions: str) -> Client:
    user = UserFactory(username="clerk", is_staff=True)
    user.user_permissions.add(*Permission.objects.filter(codename__in=permissions))
    client = Client()
    client.force_login(user)
    return client


def links(html: str) -> Any:
    return html.count(f'href="{SEARCH}"')


def test_the_admin_index_links_the_search(root: Client) -> None:
    index = root.get("/admin/").content.decode()
    assert 'href="/admin/idempotency/event/"' in index
    assert root.get("/admin/idempotency/event/").url == SEARCH
    assert 'href="/admin/idempotency/event/"' in root.get("/admin/idempotency/").content.decode()


def test_the_index_links_it_for_whoever_may_view_one_kind_of_record() -> None:
    client = clerk("view_deadletter")
    assert 'href="/admin/idempotency/event/"' in client.get("/admin/").content.decode()
    assert client.get("/admin/idempotency/event/").url == SEARCH
    assert client.get(SEARCH).status_code == 200


def test_nor_for_a_user_who_may_view_none() -> None:
    client = clerk("view_order")
    assert "/admin/idempotency/event/" not in client.get("/admin/").content.decode()
    assert client.get("/admin/idempotency/event/").status_code == 403


def test_the_inbox_list_links_the_search(root: Client) -> None:
    assert links(root.get("/admin/idempotency/processedevent/").content.decode()) == 1


# --- An event known only by its business rows or its key (the inbox and outbox purged) ---------

ORDERED = "e0e00000-0000-4000-8000-0000000000b1"


def key_naming(location: str) -> IdempotencyKey:
    return IdempotencyKey.objects.create(
        owner="1",
        endpoint="POST /api/orders/",
        key=f"k-{location}",
        fingerprint="f" * 64,
        locked_until=timezone.now() + timedelta(minutes=1),
        state="completed",
        response_status=202,
        response_headers={"Location": location},
    )


def test_an_event_known_only_by_its_business_row_is_found_by_a_prefix(root: Client) -> None:
    OrderFactory(original_event_id=ORDERED)
    for query in (ORDERED[:30], ORDERED[:9], ORDERED):
        assert root.get(SEARCH, {"q": query}).url == event_url(ORDERED), query


def test_a_prefix_lists_business_rows_next_to_the_inbox(root: Client) -> None:
    OrderFactory(original_event_id=ORDERED)
    ProcessedEvent.objects.create(
        consumer="c", event_id="e0e00000-0000-4000-8000-0000000000b2", fingerprint="a" * 64
    )
    html = root.get(SEARCH, {"q": ORDERED[:34]}).content.decode()
    assert f'href="{event_url(ORDERED)}"' in html
    assert f'href="{event_url("e0e00000-0000-4000-8000-0000000000b2")}"' in html


def test_an_event_known_only_by_its_key_is_found_by_its_whole_id(root: Client) -> None:
    key_naming("/api/orders/requests/req-7f3a9c01/")
    response = root.get(SEARCH, {"q": "req-7f3a9c01"})
    assert response.url == event_url("req-7f3a9c01")
    assert "k-/api/orders/requests/req-7f3a9c01/" in root.get(response.url).content.decode()


def test_an_unknown_id_is_still_not_found(root: Client) -> None:
    html = root.get(SEARCH, {"q": "e0e00000-0000-4000-8000-0000000000ff"}).content.decode()
    assert "No event id starts with" in html
