"""The suite's checker catches what it must: a doubled or missing effect, an orphan row.

These run with the rest of the suite (SQLite is enough): the events are applied in-process,
then the database is damaged the way a broken consumer would damage it.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from django.apps import apps
from django.db.models import F
from django.utils import timezone

from idempotency.models import DeadLetter, OutboxMessage, ProcessedEvent
from orders.models import ConfirmationEmail, Customer, LedgerEntry, Order, Product
from tests.faults import consumers
from tests.faults.harness import TASKS
from tests.faults.ledger import (
    CONFIRM,
    CUSTOMERS,
    DEBIT,
    PAY,
    PLACE,
    SHIP,
    Events,
    Ledger,
    inspect,
    seed_catalogue,
)

Applied = tuple[Ledger, dict[str, Any], dict[str, Any]]


@pytest.fixture
def applied(db: None) -> Applied:
    """One event of each type (and the audit consumer's), each applied once."""
    seed_catalogue()
    events = Events(seed=99)
    order, debit = events.place(), events.debit()
    ledger = Ledger()
    for task, event in [
        (PLACE, order),
        (DEBIT, debit),
        (PAY, events.pay(order)),
        (SHIP, events.ship(order)),
        (consumers.TASK_NAME, order),
    ]:
        TASKS[task].apply(args=[event])
        ledger.record(task, event, f"task-{len(ledger.sent)}")
        # A duplicate changes nothing, and the ledger counts each event once.
        TASKS[task].apply(args=[event])
        ledger.record(task, event, f"task-{len(ledger.sent)}")
    return ledger, order, debit


def test_each_effect_once_passes(applied: Applied) -> None:
    ledger, _, _ = applied
    result = inspect(ledger)
    assert result.problems == []
    assert (result.effects, result.lost, result.doubled) == (5, 0, 0)


def test_stock_taken_twice_is_doubled(applied: Applied) -> None:
    ledger, order, _ = applied
    item = order["items"][0]
    Product.objects.filter(product_id=item["productId"]).update(stock=F("stock") - item["quantity"])
    result = inspect(ledger)
    assert result.doubled == 1
    assert any("applied too often" in p for p in result.problems)


def test_debited_twice_is_doubled(applied: Applied) -> None:
    ledger, _, debit = applied
    Customer.objects.filter(customer_id=debit["customerId"]).update(
        balance=F("balance") - Decimal(debit["amount"])
    )
    assert inspect(ledger).doubled == 1


def test_audit_credited_twice_is_doubled(applied: Applied) -> None:
    ledger, _, _ = applied
    Customer.objects.filter(customer_id=consumers.CUSTOMER_ID).update(
        balance=F("balance") + consumers.CREDIT
    )
    assert inspect(ledger).doubled == 1


def test_an_event_never_applied_is_lost(applied: Applied) -> None:
    ledger, _, _ = applied
    ledger.record(DEBIT, Events(seed=100).debit(), "never-delivered")
    result = inspect(ledger)
    assert result.lost >= 1
    assert any("no inbox record" in p for p in result.problems)


def test_business_row_without_inbox_record(applied: Applied) -> None:
    ledger, _, debit = applied
    ProcessedEvent.objects.filter(event_id=debit["eventId"]).delete()
    result = inspect(ledger)
    assert any("has no inbox record" in p for p in result.problems)
    assert (result.lost, result.doubled) == (0, 0), "the effect itself is there, once"


def test_inbox_record_without_business_row(applied: Applied) -> None:
    ledger, _, debit = applied
    LedgerEntry.objects.filter(original_event_id=debit["eventId"]).delete()
    result = inspect(ledger)
    assert any("has no business row" in p for p in result.problems)
    assert result.lost >= 1


def test_wrong_order_status(applied: Applied) -> None:
    ledger, order, _ = applied
    Order.objects.filter(order_id=order["orderId"]).update(status=Order.Status.PAID)
    assert any("expected shipped" in p for p in inspect(ledger).problems)


def test_dead_letters_must_be_expected(applied: Applied) -> None:
    ledger, _, debit = applied
    assert any("dead-letter queue" in p for p in inspect(ledger, broker_dead=1).problems)
    ledger.expect_dead_letter(DEBIT, debit["eventId"])
    assert any("dead letters stored" in p for p in inspect(ledger).problems)


def test_stored_dead_letter_is_reported(applied: Applied) -> None:
    try:
        model = apps.get_model("idempotency", "DeadLetter")
    except LookupError:
        pytest.skip("the app stores no dead letters")
    ledger, _, debit = applied
    model.objects.create(reason="failed", task_name=DEBIT, event_id=debit["eventId"])
    result = inspect(ledger)
    assert result.dead_letters == 1
    assert any("dead letters stored" in p for p in result.problems)
    ledger.expect_dead_letter(DEBIT, debit["eventId"])
    assert not any("dead letters" in p for p in inspect(ledger).problems)


def test_extra_dead_letter_keeps_the_effect_expected(applied: Applied) -> None:
    """A duplicate's failed delivery: its dead letter is expected, and so is the effect."""
    ledger, _, debit = applied
    DeadLetter.objects.create(reason="failed", task_name=DEBIT, event_id=debit["eventId"])
    assert any("dead letters stored" in p for p in inspect(ledger).problems)
    ledger.expect_extra_dead_letters(DEBIT, debit["eventId"], 1)
    assert inspect(ledger).problems == []
    assert inspect(ledger, broker_dead=1).problems == []
    # Not a licence for any number of them.
    DeadLetter.objects.create(reason="failed", task_name=DEBIT, event_id=debit["eventId"])
    assert any("dead letters stored" in p for p in inspect(ledger).problems)


def test_failed_outbox_messages_must_be_expected(applied: Applied) -> None:
    ledger, _, _ = applied
    row = OutboxMessage.objects.create(task_name=PLACE, args=[{}], failed_at=timezone.now())
    result = inspect(ledger)
    assert result.failed_outbox == 1
    assert any("failed outbox messages" in p for p in result.problems)
    assert result.lost == 1
    ledger.failed_outbox.add(str(row.task_id))
    # Expected, but a failed row must say why.
    assert any("gives no reason" in p for p in inspect(ledger).problems)
    OutboxMessage.objects.filter(pk=row.pk).update(last_error="QueueNotFound('gone')")
    assert inspect(ledger).problems == []
    # Expected to fail, yet still pending: reported too.
    OutboxMessage.objects.filter(pk=row.pk).update(failed_at=None)
    assert any("failed outbox messages" in p for p in inspect(ledger).problems)


@pytest.fixture
def confirmed(db: None) -> tuple[Ledger, dict[str, Any]]:
    """An order of a customer with an email address, and its confirmation, each applied once."""
    seed_catalogue()
    Customer.objects.filter(customer_id__in=CUSTOMERS).update(email="shopper@example.com")
    order = Events(seed=98).place()
    ledger = Ledger(emailed=set(CUSTOMERS))
    TASKS[PLACE].apply(args=[order])
    ledger.record(PLACE, order, "task-0")
    message = OutboxMessage.objects.get(task_name=CONFIRM)
    TASKS[CONFIRM].apply(args=message.args)
    # The publish after commit does not run in a test's transaction: as if it had.
    OutboxMessage.objects.filter(pk=message.pk).update(published_at=timezone.now())
    return ledger, order


def test_a_confirmation_is_an_effect_of_its_own(confirmed: tuple[Ledger, dict[str, Any]]) -> None:
    ledger, _ = confirmed
    result = inspect(ledger)
    assert result.problems == []
    assert (result.effects, result.lost, result.doubled) == (2, 0, 0)


def test_a_confirmation_never_recorded_is_lost(confirmed: tuple[Ledger, dict[str, Any]]) -> None:
    ledger, _ = confirmed
    ConfirmationEmail.objects.all().delete()
    result = inspect(ledger)
    assert result.lost == 1
    assert any("no effect of orders.tasks.send_order_confirmation" in p for p in result.problems)


def test_order_placed_unpublished_or_stored_twice_is_reported(
    confirmed: tuple[Ledger, dict[str, Any]],
) -> None:
    ledger, _ = confirmed
    message = OutboxMessage.objects.get(task_name=CONFIRM)
    OutboxMessage.objects.filter(pk=message.pk).update(published_at=None)
    result = inspect(ledger)
    assert result.lost == 1
    assert any("never published" in p for p in result.problems)
    OutboxMessage.objects.filter(pk=message.pk).update(published_at=timezone.now())
    OutboxMessage.objects.create(
        task_name=CONFIRM, args=message.args, event_id=message.event_id, published_at=timezone.now()
    )
    assert any("2 outbox messages for OrderPlaced" in p for p in inspect(ledger).problems)


def test_without_an_email_address_no_confirmation_is_expected(applied: Applied) -> None:
    ledger, _, _ = applied
    ledger.emailed = set(CUSTOMERS)  # the ledger expects one; the customers have no address
    result = inspect(ledger)
    assert result.lost == 1
