"""DebitAccount: the classic non-idempotent "deduct $10 from account X", applied once."""

from __future__ import annotations

from decimal import Decimal

import pytest

from idempotency.models import Outcome, ProcessedEvent
from orders.models import Customer, LedgerEntry
from orders.tasks import debit_account
from tests.factories import CustomerFactory, debit_account_event
from tests.orders.helpers import deliver

pytestmark = pytest.mark.django_db


@pytest.fixture
def customer() -> Customer:
    return CustomerFactory(customer_id="CUST-1", balance=Decimal("100.00"))


def test_a_debit_applies_once_however_often_delivered(customer: Customer) -> None:
    event = debit_account_event(amount="10.00")
    results = [deliver(debit_account, event) for _ in range(3)]
    assert results == [{"customerId": "CUST-1", "status": "debited", "balance": "90.00"}] * 3
    customer.refresh_from_db()
    assert customer.balance == Decimal("90.00")
    entry = LedgerEntry.objects.get()
    assert (entry.amount, entry.balance_after, entry.reason) == (
        Decimal("-10.00"),
        Decimal("90.00"),
        "monthly fee",
    )
    assert str(entry.original_event_id) == event["eventId"]


def test_two_debits_are_two_effects(customer: Customer) -> None:
    deliver(debit_account, debit_account_event(amount="10.00"))
    deliver(debit_account, debit_account_event(amount="15.50"))
    customer.refresh_from_db()
    assert customer.balance == Decimal("74.50")
    assert LedgerEntry.objects.count() == 2


def test_an_overdraft_is_rejected_finally(customer: Customer) -> None:
    event = debit_account_event(amount="100.01")
    result = deliver(debit_account, event)
    assert result["status"] == "rejected"
    assert result["reason"] == "insufficient balance to debit 100.01 from CUST-1"
    customer.refresh_from_db()
    assert customer.balance == Decimal("100.00")
    assert not LedgerEntry.objects.exists()
    assert ProcessedEvent.objects.get().outcome == Outcome.REJECTED
    assert deliver(debit_account, event) == result  # a redelivery gets the same answer


def test_the_whole_balance_can_be_debited(customer: Customer) -> None:
    deliver(debit_account, debit_account_event(amount="100.00"))
    customer.refresh_from_db()
    assert customer.balance == 0


def test_an_unknown_customer_is_rejected() -> None:
    result = deliver(debit_account, debit_account_event(customerId="CUST-404"))
    assert result["reason"] == "unknown customer CUST-404"


def test_the_ledger_entry_guards_when_the_inbox_forgot(customer: Customer) -> None:
    event = debit_account_event(amount="10.00")
    first = deliver(debit_account, event)
    ProcessedEvent.objects.all().delete()  # as a purge would
    assert deliver(debit_account, event) == first
    customer.refresh_from_db()
    assert customer.balance == Decimal("90.00")
    assert LedgerEntry.objects.count() == 1
    assert ProcessedEvent.objects.get().outcome == Outcome.PROCESSED
