"""The example's admin shows its times to the millisecond, as the idempotency admins do."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import pytest
from django.db import models
from django.test import Client

pytestmark = pytest.mark.django_db

#: Two steps of one event often fall within the same minute, and within the same second.
AT = datetime(2026, 12, 1, 13, 5, 48, 123_000, tzinfo=timezone.utc)
SHOWN = "2026-12-01 13:05:48.123 UTC"


@pytest.fixture
def rows(event_rows: dict[str, Any]) -> dict[str, Any]:
    """The rows, each time of each set to :data:`AT`."""
    for row in event_rows.values():
        times = [f.name for f in row._meta.fields if isinstance(f, models.DateTimeField)]
        type(row).objects.filter(pk=row.pk).update(**dict.fromkeys(times, AT))
    return event_rows


@pytest.mark.parametrize(
    "model", ["order", "payment", "ledgerentry", "rejection", "confirmationemail"]
)
def test_the_changelists_show_milliseconds(root: Client, rows: dict[str, Any], model: str) -> None:
    html = root.get(f"/admin/orders/{model}/").content.decode()
    assert SHOWN in html, model


@pytest.mark.parametrize(
    ("model", "times"),
    [
        ("order", 3),  # created at, shipped at, and the payment inline's received at
        ("payment", 1),
        ("ledgerentry", 1),
        ("rejection", 1),
        ("confirmationemail", 1),
    ],
)
def test_the_detail_pages_show_milliseconds(
    root: Client, rows: dict[str, Any], model: str, times: int
) -> None:
    row = rows[model]
    html = root.get(f"/admin/orders/{model}/{row.pk}/change/").content.decode()
    assert html.count(SHOWN) == times, model


def test_the_ledger_inline_shows_milliseconds(root: Client, rows: dict[str, Any]) -> None:
    customer = rows["order"].customer
    html = root.get(f"/admin/orders/customer/{customer.pk}/change/").content.decode()
    assert html.count(SHOWN) == 1  # the ledger entry's created at
