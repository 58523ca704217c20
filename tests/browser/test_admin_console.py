"""The admin as an operator uses it, in chromium: log in, open each page, run the actions.

Fifty mixed events (tests/browser/story.py) are posted and delivered first; the screenshots
land in var/screenshots/ (docs/lifecycle.md lists them).
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from rest_framework.test import APIClient

from idempotency.admin_base import event_url
from idempotency.models import DeadLetter, OutboxMessage, ProcessedEvent
from orders import tasks
from orders.models import Order
from tests.browser.conftest import Admin
from tests.browser.story import GHOST_ORDER, Story, build

pytestmark = [pytest.mark.services, pytest.mark.django_db(transaction=True)]

MILLISECONDS = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} UTC")


@pytest.fixture
def story(api_client: APIClient, settings: Any) -> Story:
    # Payloads stored, so that "forget and re-drive" is offered and can work.
    settings.IDEMPOTENCY = {**settings.IDEMPOTENCY, "STORE_PAYLOADS": True}
    return build(api_client)


def test_every_page_of_the_console(admin_page: Admin, story: Story) -> None:
    page = admin_page.open("/admin/")
    assert page.locator("#user-tools").inner_text().upper().startswith("WELCOME")
    assert page.get_by_role("link", name="Find an event").is_visible()
    admin_page.shoot("01-dashboard")

    page = admin_page.open("/admin/idempotency/processedevent/")
    assert page.locator("#inbox-stats").is_visible()
    assert MILLISECONDS.search(page.locator("#result_list").inner_text())
    admin_page.shoot("02-inbox")

    page = admin_page.open("/admin/idempotency/outboxmessage/")
    assert page.locator("#result_list tbody tr").count() == OutboxMessage.objects.count()
    admin_page.shoot("03-outbox")

    page = admin_page.open("/admin/idempotency/deadletter/")
    assert page.locator("#result_list tbody tr").count() == 3
    admin_page.shoot("04-dead-letters")

    ghost = DeadLetter.objects.get(event_id=story.ghost_payment["eventId"])
    page = admin_page.open(f"/admin/idempotency/deadletter/{ghost.pk}/change/")
    traceback = page.locator("pre.idem-traceback").inner_text()
    assert "\n  File " in traceback  # indented as Python wrote it
    admin_page.shoot("05-dead-letter")

    page = admin_page.open("/admin/idempotency/idempotencykey/")
    assert "checkout-7f3a" in page.locator("#result_list").inner_text()
    admin_page.shoot("06-keys")

    page = admin_page.open("/admin/orders/order/")
    assert page.locator('a.addlink:has-text("Add order")').count() == 0
    admin_page.shoot("07-orders")

    order = Order.objects.get(original_event_id=story.followed["eventId"])
    page = admin_page.open(f"/admin/orders/order/{order.pk}/change/")
    assert page.locator('select[name="status"], input[name="total"]').count() == 0
    assert page.locator('input[name="_save"]').count() == 0
    admin_page.shoot("08-order-read-only")


def test_what_happened_to_an_event_from_search_to_every_record(
    admin_page: Admin, story: Story
) -> None:
    event_id = story.followed["eventId"]
    # From the inbox's list, through its "Find an event" link, with the id's first characters.
    page = admin_page.open("/admin/idempotency/processedevent/")
    page.click("#find-an-event")
    page.wait_for_url(re.compile(r"/admin/idempotency/processedevent/event/$"))
    page.fill("#event-q", event_id[:34])
    page.click('#event-search input[type="submit"]')
    page.wait_for_load_state()
    matches = page.locator("#event-matches a")
    assert matches.count() > 1
    admin_page.shoot("09-event-search")
    page.fill("#event-q", event_id)
    page.click('#event-search input[type="submit"]')
    page.wait_for_url(re.compile(re.escape(event_url(event_id)) + "$"))
    assert page.locator("#event-outbox tbody tr").count() == 3  # posted three times
    inbox = page.locator("#event-inbox tbody tr")
    assert inbox.count() == 1
    assert "orders.tasks.place_order" in inbox.inner_text()
    assert page.locator("#event-entities").get_by_text("ORD-001").count() == 1
    assert MILLISECONDS.search(page.locator("#event-timeline").inner_text())
    admin_page.shoot("10-event-page")

    # Each record links to its own page, and back.
    page.locator("#event-inbox tbody a").first.click()
    page.wait_for_load_state()
    assert "/admin/idempotency/processedevent/" in page.url
    page.get_by_role("link", name="what happened to it").first.click()
    page.wait_for_url(re.compile(re.escape(event_url(event_id)) + "$"))
    page.locator("#event-entities a").first.click()
    page.wait_for_load_state()
    assert "/admin/orders/order/" in page.url
    page.get_by_role("link", name="what happened to it").click()
    page.wait_for_url(re.compile(re.escape(event_url(event_id)) + "$"))

    page = admin_page.open(event_url(story.ghost_payment["eventId"]))
    assert GHOST_ORDER in page.locator("#event-dead-letters").inner_text()
    admin_page.shoot("11-event-dead-lettered")

    page = admin_page.open(event_url(story.mismatched["eventId"]))
    assert "yes" in page.locator("#event-inbox").inner_text()
    assert "PayloadMismatch" in page.locator("#event-dead-letters").inner_text()
    admin_page.shoot("12-event-mismatch")

    page = admin_page.open(event_url(story.keyed_event_id))
    assert "checkout-7f3a" in page.locator("#event-keys").inner_text()
    admin_page.shoot("13-event-keyed")


def test_the_actions(admin_page: Admin, story: Story, monkeypatch: pytest.MonkeyPatch) -> None:
    # Re-drive a dead letter: done once, then left alone, with the event's page linked.
    ghost = DeadLetter.objects.get(event_id=story.ghost_payment["eventId"])
    admin_page.open("/admin/idempotency/deadletter/")
    page = admin_page.run_action("redrive", [ghost.pk])
    assert "Re-drove 1 dead letter" in page.locator("ul.messagelist").inner_text()
    admin_page.shoot("14-redrive")
    page = admin_page.run_action("redrive", [ghost.pk])
    assert "already re-driven" in page.locator("ul.messagelist").inner_text()
    # A mismatch's letter: not re-driven, and the admin says why.
    mismatch = DeadLetter.objects.get(event_id=story.mismatched["eventId"])
    page = admin_page.run_action("redrive", [mismatch.pk])
    assert "forget the inbox record first" in page.locator("ul.messagelist").inner_text()
    admin_page.shoot("15-redrive-refused")
    ghost.refresh_from_db()
    mismatch.refresh_from_db()
    assert (ghost.redrive_count, mismatch.redrive_count) == (1, 0)

    # Forget and re-drive an inbox record: forgotten, its stored payload published again.
    record = ProcessedEvent.objects.get(
        event_id=story.events[1]["eventId"], consumer=tasks.place_order.name
    )
    published: list[Any] = []
    monkeypatch.setattr(
        tasks.place_order, "apply_async", lambda args=None, **kw: published.append(args)
    )
    page = admin_page.open(f"/admin/idempotency/processedevent/?q={record.event_id}")
    page = admin_page.run_action("forget_and_redrive", [record.pk])
    assert "Forgot and re-drove 1 event" in page.locator("ul.messagelist").inner_text()
    assert published == [[record.payload]]
    assert not ProcessedEvent.objects.filter(pk=record.pk).exists()
    admin_page.shoot("16-forget-and-redrive")

    # Forget another: gone, logged.
    other = ProcessedEvent.objects.get(event_id=story.events[2]["eventId"])
    admin_page.open(f"/admin/idempotency/processedevent/?q={other.event_id}")
    page = admin_page.run_action("forget", [other.pk])
    assert "Forgot 1 event" in page.locator("ul.messagelist").inner_text()
    assert not ProcessedEvent.objects.filter(pk=other.pk).exists()
    admin_page.shoot("17-forget")
