"""The console's pages fit the 1400 px window the screenshots are taken in.

A wide table is no failure for a screenshot, whose file is as big either way: these tests
measure the rendered boxes instead. Nothing may stretch the page past the window, no table may
run out of its module, and no changelist may hide columns behind its horizontal scrollbar.
"""

from __future__ import annotations

from typing import Any

import pytest
from rest_framework.test import APIClient

from idempotency.admin_base import event_url
from idempotency.models import DeadLetter
from tests.browser.conftest import Admin
from tests.browser.story import Story, build

pytestmark = [pytest.mark.services, pytest.mark.django_db(transaction=True)]

#: Every box a page draws, right edge against its module's and the window's (in CSS pixels).
MEASURE = """() => {
  const width = window.innerWidth;
  const out = {page: document.documentElement.scrollWidth, width, tables: [], hidden: []};
  for (const table of document.querySelectorAll("#content-main table")) {
    const box = table.closest(".module, .results") || document.getElementById("content-main");
    const right = table.getBoundingClientRect().right, limit = box.getBoundingClientRect().right;
    if (right > limit + 1) out.tables.push([table.id || box.id || box.className, right, limit]);
  }
  for (const results of document.querySelectorAll("#changelist .results")) {
    if (results.scrollWidth > results.clientWidth + 1)
      out.hidden.push([results.scrollWidth, results.clientWidth]);
  }
  return out;
}"""


@pytest.fixture
def story(api_client: APIClient) -> Story:
    return build(api_client)


def fits(admin_page: Admin, path: str) -> None:
    page = admin_page.open(path)
    measured = page.evaluate(MEASURE)
    assert measured["page"] <= measured["width"], (path, measured)
    assert measured["tables"] == [], (path, measured)
    assert measured["hidden"] == [], (path, measured)


def test_the_event_pages_fit_the_window(admin_page: Admin, story: Story) -> None:
    for event_id in (
        story.followed["eventId"],
        story.ghost_payment["eventId"],
        story.mismatched["eventId"],
        story.keyed_event_id,
    ):
        fits(admin_page, event_url(event_id))


def test_the_changelists_fit_the_window(admin_page: Admin, story: Story) -> None:
    for changelist in ("processedevent", "outboxmessage", "deadletter", "idempotencykey"):
        fits(admin_page, f"/admin/idempotency/{changelist}/")
    # Re-driven: the dead letters' "re-driven at" and "event" columns are filled in.
    ghost = DeadLetter.objects.get(event_id=story.ghost_payment["eventId"])
    admin_page.open("/admin/idempotency/deadletter/")
    admin_page.run_action("redrive", [ghost.pk])
    fits(admin_page, "/admin/idempotency/deadletter/")
    admin_page.shoot("18-dead-letters-redriven")


def test_the_pages_of_a_dead_letter_and_a_record_fit_the_window(
    admin_page: Admin, story: Story
) -> None:
    ghost: Any = DeadLetter.objects.get(event_id=story.ghost_payment["eventId"])
    fits(admin_page, f"/admin/idempotency/deadletter/{ghost.pk}/change/")
