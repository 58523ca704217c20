"""Finding an event: the search page, reached from the admin's index and the inbox's list."""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib.auth.models import Permission
from django.test import Client

from tests.factories import UserFactory

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
