"""An event and the Idempotency-Key whose stored response names it, linked both ways.

The key keeps the event's id inside a URL of its response (``Location``, ``Content-Location``):
the id is one whole segment of that URL's path, compared exactly, as event ids are.
"""

from __future__ import annotations

import re
from datetime import timedelta
from itertools import count
from urllib.parse import unquote

import pytest
from django.test import Client
from django.utils import timezone

from idempotency.admin_base import event_url
from idempotency.console.story import event_story
from idempotency.models import IdempotencyKey, ProcessedEvent
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db

_keys = count()


def key_naming(location: str, header: str = "Location") -> IdempotencyKey:
    return IdempotencyKey.objects.create(
        owner="1",
        endpoint="POST /api/orders/",
        key=f"k-{next(_keys)}",
        fingerprint="f" * 64,
        locked_until=timezone.now() + timedelta(minutes=1),
        state="completed",
        response_status=202,
        response_headers={header: location},
    )


def keys_of(event_id: str) -> list[IdempotencyKey]:
    return event_story(event_id).keys


@pytest.fixture
def root() -> Client:
    client = Client()
    client.force_login(UserFactory(username="root", is_staff=True, is_superuser=True))
    return client


def event_of(client: Client, key: IdempotencyKey) -> str:
    """The event the key's admin page links to, ``""`` for none."""
    html = client.get(f"/admin/idempotency/idempotencykey/{key.pk}/change/").content.decode()
    link = re.search(r'<a href="/admin/idempotency/processedevent/event/(.*?)/" class', html)
    return unquote(link.group(1)) if link else ""


def test_the_key_is_on_the_page_of_the_id_its_location_names_only() -> None:
    key = key_naming("/api/orders/requests/abcdef12-3456/")
    assert keys_of("abcdef12-3456") == [key]
    for other in ("ABCDEF12-3456", "abcdef12-345", "cdef12-34", "abcdef12-34567", "requests/a"):
        assert keys_of(other) == [], other


def test_absolute_urls_content_location_and_encoded_ids() -> None:
    absolute = key_naming("https://shop.example/api/events/Ord-42.a~b?after=abcdef12-3456#x")
    content = key_naming("/api/orders/requests/e0e00000-0000/", header="Content-Location")
    encoded = key_naming("/api/events/ord%3A42%20%C3%BC%2Fb/")
    assert keys_of("Ord-42.a~b") == [absolute]
    assert keys_of("abcdef12-3456") == []  # in the query string, not the path
    assert keys_of("e0e00000-0000") == [content]
    assert keys_of("ord:42 ü/b") == [encoded]


def test_the_keys_page_links_the_event_a_record_knows_as_written(root: Client) -> None:
    ProcessedEvent.objects.create(consumer="c", event_id="req-7f3a9c01", fingerprint="a" * 64)
    key = key_naming("/api/orders/requests/req-7f3a9c01/status/")
    assert event_of(root, key) == "req-7f3a9c01"
    page = root.get(event_url("req-7f3a9c01")).content.decode()
    assert f"/admin/idempotency/idempotencykey/{key.pk}/change/" in page
    upper = "ABCDEF12-3456-4000-8000-0000000000C1"
    ProcessedEvent.objects.create(consumer="c", event_id=upper, fingerprint="a" * 64)
    assert event_of(root, key_naming(f"/api/orders/requests/{upper}/")) == upper


def test_a_uuid_no_record_names_is_still_the_keys_event(root: Client) -> None:
    purged = "e0e00000-0000-4000-8000-0000000000c2"  # its records purged since
    assert event_of(root, key_naming(f"/api/orders/requests/{purged}/")) == purged
    assert event_of(root, key_naming("/api/orders/requests/unknown-id/")) == ""
