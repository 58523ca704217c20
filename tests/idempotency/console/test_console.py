"""The admin as an operations console: one page per event, linked both ways with each record."""

from __future__ import annotations

import re

import pytest
from django.contrib.auth.models import Permission
from django.test import Client
from rest_framework.test import APIClient

from idempotency.admin_base import event_url, precise
from idempotency.models import DeadLetter, IdempotencyKey, OutboxMessage, ProcessedEvent
from orders.models import Order
from tests.browser.story import GHOST_ORDER, Story, build
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def story(api_client: APIClient) -> Story:
    return build(api_client)


@pytest.fixture
def root() -> Client:
    client = Client()
    client.force_login(UserFactory(username="root", is_staff=True, is_superuser=True))
    return client


def page(client: Client, event_id: str) -> str:
    response = client.get(event_url(event_id))
    assert response.status_code == 200
    return response.content.decode()


def test_the_page_of_an_event_shows_every_record_of_it_each_linked(
    story: Story, root: Client
) -> None:
    event_id = story.followed["eventId"]
    html = page(root, event_id)
    messages = list(OutboxMessage.objects.filter(event_id=event_id))
    assert len(messages) == 3  # posted three times; published three times
    message = messages[0]
    record = ProcessedEvent.objects.get(event_id=event_id)
    order = Order.objects.get(original_event_id=event_id)
    assert f"/admin/idempotency/outboxmessage/{message.pk}/change/" in html
    for each in messages:
        assert f"/admin/idempotency/outboxmessage/{each.pk}/change/" in html
        assert precise(each.published_at) in html  # to the millisecond
    assert re.search(r"\d\d:\d\d:\d\d\.\d{3} UTC", html)
    assert f"/admin/idempotency/processedevent/{record.pk}/change/" in html
    assert record.duplicate_count == 2
    assert '<td class="num">2' in html  # delivered twice more, both discarded
    assert f"/admin/orders/order/{order.pk}/change/" in html
    assert "&quot;orderId&quot;: &quot;ORD-001&quot;" in html  # the result, pretty-printed
    # And back: each record's page, and the order's, links to the event's page.
    url = event_url(event_id)
    for change in (
        f"/admin/idempotency/outboxmessage/{message.pk}/change/",
        f"/admin/idempotency/processedevent/{record.pk}/change/",
        f"/admin/orders/order/{order.pk}/change/",
    ):
        assert url in root.get(change).content.decode(), change


def test_a_dead_lettered_event_shows_its_letter_with_the_traceback_indented(
    story: Story, root: Client
) -> None:
    event_id = story.ghost_payment["eventId"]
    letter = DeadLetter.objects.get(event_id=event_id)
    html = page(root, event_id)
    assert f"/admin/idempotency/deadletter/{letter.pk}/change/" in html
    assert GHOST_ORDER in html
    assert 'id="event-inbox"' in html
    assert "no consumer has processed it" in html
    detail = root.get(f"/admin/idempotency/deadletter/{letter.pk}/change/").content.decode()
    assert event_url(event_id) in detail
    pre = re.search(r'<pre class="idem-traceback">(.*?)</pre>', detail, re.S)
    assert pre is not None
    assert "\n  File " in pre.group(1)  # the traceback's own indentation, kept


def section(html: str, name: str) -> str:
    """The page's module ``id=name``, up to the next module."""
    start = html.index(f'id="{name}"')
    end = html.find('<div class="module"', start)
    return html[start : end if end != -1 else len(html)]


def test_a_mismatch_shows_on_the_page_with_its_dead_letter(story: Story, root: Client) -> None:
    event_id = story.mismatched["eventId"]
    record = ProcessedEvent.objects.get(event_id=event_id)
    assert record.has_mismatch
    letter = DeadLetter.objects.get(event_id=event_id)
    html = page(root, event_id)
    # The inbox record: marked as a mismatch, when, and a link to the record's diff.
    change = f"/admin/idempotency/processedevent/{record.pk}/change/"
    marker = (
        f'<span class="bad">yes</span>, <span class="when">{precise(record.mismatch_at)}</span>'
        f' (<a href="{change}">diff</a>)'
    )
    assert marker in section(html, "event-inbox")
    assert "compare the two fingerprints" in root.get(change).content.decode()
    # The mismatching delivery's dead letter, with the exception that made it.
    letters = section(html, "event-dead-letters")
    assert f"/admin/idempotency/deadletter/{letter.pk}/change/" in letters
    assert "PayloadMismatch" in letters


def test_the_key_of_a_keyed_request_is_on_its_events_page_and_links_back(
    story: Story, root: Client
) -> None:
    key = IdempotencyKey.objects.get(key="checkout-7f3a")
    html = page(root, story.keyed_event_id)
    assert f"/admin/idempotency/idempotencykey/{key.pk}/change/" in html
    assert Order.objects.filter(original_event_id=story.keyed_event_id).exists()
    detail = root.get(f"/admin/idempotency/idempotencykey/{key.pk}/change/").content.decode()
    assert event_url(story.keyed_event_id) in detail


def test_an_unknown_event_says_so(root: Client) -> None:
    assert "No record of this event" in page(root, "never-seen-0000")


def test_search_by_a_prefix(story: Story, root: Client) -> None:
    search = "/admin/idempotency/processedevent/event/"
    event_id = story.ghost_payment["eventId"]
    # The whole id, or a prefix only it has: straight to its page.
    assert root.get(search, {"q": event_id}).url == event_url(event_id)
    # A prefix that many ids share: the list of them.
    html = root.get(search, {"q": "e0e00000-0000-4000-8000-00000000001"}).content.decode()
    assert html.count('href="/admin/idempotency/processedevent/event/e0e00000') == 16
    assert "No event id starts with" in root.get(search, {"q": "zzz"}).content.decode()
    # The changelists take a prefix too.
    followed = story.followed["eventId"]
    for changelist, wanted in [
        ("processedevent", followed),
        ("outboxmessage", followed),
        ("deadletter", event_id),
    ]:
        response = root.get(f"/admin/idempotency/{changelist}/", {"q": wanted[:34]})
        assert wanted in response.content.decode(), changelist
        assert len(response.context["cl"].result_list) >= 1


def test_times_show_milliseconds_in_the_changelists(story: Story, root: Client) -> None:
    for changelist in ("processedevent", "outboxmessage", "deadletter"):
        html = root.get(f"/admin/idempotency/{changelist}/").content.decode()
        assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} UTC", html), changelist


def test_the_page_shows_only_what_the_user_may_view(story: Story) -> None:
    clerk = UserFactory(username="clerk", is_staff=True)
    clerk.user_permissions.add(Permission.objects.get(codename="view_deadletter"))
    client = Client()
    client.force_login(clerk)
    html = page(client, story.followed["eventId"])
    assert 'id="event-dead-letters"' in html
    for hidden in ("event-inbox", "event-outbox", "event-keys"):
        assert f'id="{hidden}"' not in html
    assert "/admin/orders/order/" not in html
    anonymous = Client().get(event_url(story.followed["eventId"]))
    assert anonymous.status_code == 302  # to the login page


def test_the_event_page_handles_hostile_ids(root: Client) -> None:
    for hostile in ["a/b/../c", "<script>x</script>", "x" * 300, "%00", "ü|ç"]:
        response = root.get(event_url(hostile))
        assert response.status_code == 200, hostile
        assert "<script>x" not in response.content.decode()
    assert root.get("/admin/idempotency/processedevent/event/", {"q": "\x00"}).status_code in (
        200,
        400,
    )
