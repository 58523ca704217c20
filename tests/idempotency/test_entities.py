from __future__ import annotations

import uuid
from decimal import Decimal

import pytest
from django.db import transaction
from django.db.models import F

from idempotency.entities import EventIdField, create_once, event_keyed_models, rows_for_event
from idempotency.exceptions import TransactionRequired
from idempotency.inbox import idempotent
from idempotency.models import ProcessedEvent
from orders.models import Customer, Order
from tests.factories import CustomerFactory

pytestmark = pytest.mark.django_db


def test_the_field_is_unique_indexed_and_not_editable() -> None:
    field = Order._meta.get_field("original_event_id")
    assert isinstance(field, EventIdField)
    assert field.unique
    assert not field.editable
    assert Order in event_keyed_models()


def test_create_once_returns_the_existing_row() -> None:
    event_id = uuid.uuid4()
    defaults = {"order_id": "ORD-1", "requested_customer_id": "C", "status": "accepted"}
    with transaction.atomic():
        first, created = create_once(Order, event_id, defaults)
        again, created_again = create_once(Order, event_id, {**defaults, "order_id": "ORD-2"})
    assert created
    assert not created_again
    assert again.pk == first.pk
    assert Order.objects.get().order_id == "ORD-1"
    assert rows_for_event(str(event_id)) == [first]
    assert rows_for_event("not-a-uuid") == []


@pytest.mark.django_db(transaction=True)
def test_create_once_needs_a_transaction() -> None:
    with pytest.raises(TransactionRequired):
        create_once(Order, uuid.uuid4(), {})


def debit(customer_id: str, event_id: str, amount: Decimal) -> None:
    """The documented way to make "deduct $10 from account X" apply once."""
    with idempotent("accounts.debit", event_id) as claim:
        if claim.duplicate:
            return
        Customer.objects.filter(customer_id=customer_id).update(balance=F("balance") - amount)


def test_a_non_idempotent_debit_applies_once() -> None:
    CustomerFactory(customer_id="CUST-1", balance=Decimal("100.00"))
    for _ in range(3):
        debit("CUST-1", "debit-1", Decimal("10.00"))
    debit("CUST-1", "debit-2", Decimal("10.00"))
    assert Customer.objects.get().balance == Decimal("80.00")
    assert ProcessedEvent.objects.for_consumer("accounts.debit").count() == 2
