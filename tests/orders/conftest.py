"""Fixtures of the example's admin tests."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client

from orders.models import ConfirmationEmail, Rejection
from tests.factories import LedgerEntryFactory, OrderFactory, PaymentFactory, UserFactory


@pytest.fixture
def root(db: Any) -> Client:
    client = Client()
    client.force_login(UserFactory(username="root", is_staff=True, is_superuser=True))
    return client


@pytest.fixture
def event_rows(db: Any) -> dict[str, Any]:
    """One row of each event-derived model with an admin page, by model name."""
    order = OrderFactory()
    return {
        "order": order,
        "payment": PaymentFactory(order=order),
        "ledgerentry": LedgerEntryFactory(customer=order.customer),
        "rejection": Rejection.objects.create(
            original_event_id="e0e00000-0000-4000-8000-0000000000a1",
            consumer="orders.tasks.place_order",
            reason="no stock",
        ),
        "confirmationemail": ConfirmationEmail.objects.create(
            original_event_id="e0e00000-0000-4000-8000-0000000000a2",
            order=order,
            recipient="a@example.com",
            message_id="<m1@example.com>",
        ),
    }
