"""The example's rows and their events: found by the start of the event id, linked both ways."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client

from idempotency.admin_base import event_url

pytestmark = pytest.mark.django_db

MODELS = ["order", "payment", "ledgerentry", "rejection", "confirmationemail"]


@pytest.mark.parametrize("model", MODELS)
def test_a_changelist_finds_a_row_by_the_start_of_its_event_id(
    root: Client, event_rows: dict[str, Any], model: str
) -> None:
    row = event_rows[model]
    event_id = str(row.original_event_id)
    for query in (event_id[:30], event_id[:8], event_id):
        response = root.get(f"/admin/orders/{model}/", {"q": query})
        assert list(response.context["cl"].result_list) == [row], (model, query)
    other = ("1" if event_id[0] == "0" else "0") + event_id[1:30]  # another event's start
    response = root.get(f"/admin/orders/{model}/", {"q": other})
    assert list(response.context["cl"].result_list) == [], model


@pytest.mark.parametrize("model", MODELS)
def test_a_row_links_to_its_events_page_and_back(
    root: Client, event_rows: dict[str, Any], model: str
) -> None:
    row = event_rows[model]
    change = f"/admin/orders/{model}/{row.pk}/change/"
    url = event_url(str(row.original_event_id))
    assert f'href="{url}"' in root.get(change).content.decode(), model
    assert f'href="{change}"' in root.get(url).content.decode(), model
