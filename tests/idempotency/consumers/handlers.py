"""Handlers the consumer tests run, in-process and in a ``consume_events`` process.

``credit`` has a countable effect: one unit credited to the ``CONSUMED`` customer and one ledger
entry whose reason names the event. An event may ask it to touch a file once it runs (``touch``)
and to take its time (``sleep``), so a test can stop the process while it is in hand.
"""

from __future__ import annotations

import time
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

from django.db.models import F

from orders.models import Customer, LedgerEntry

CUSTOMER_ID = "CONSUMED"
CREDIT = Decimal("1.00")


def reason_for(event_id: str) -> str:
    return f"consumed {event_id}"


def ensure_customer() -> Customer:
    customer, _ = Customer.objects.get_or_create(customer_id=CUSTOMER_ID)
    return customer


def effects(event_id: str) -> int:
    return LedgerEntry.objects.filter(reason=reason_for(event_id)).count()


def credit(event: dict[str, Any]) -> dict[str, Any]:
    event_id = str(event["eventId"])
    if touch := event.get("touch"):
        Path(touch).write_text("running")
    if seconds := event.get("sleep"):
        time.sleep(float(seconds))
    Customer.objects.filter(customer_id=CUSTOMER_ID).update(balance=F("balance") + CREDIT)
    customer = Customer.objects.get(customer_id=CUSTOMER_ID)
    LedgerEntry.objects.create(
        customer=customer,
        amount=CREDIT,
        reason=reason_for(event_id),
        balance_after=customer.balance,
        # A fresh id, not one derived from the event: the entity key must not hide a second
        # application from the tests, only the inbox may prevent it.
        original_event_id=uuid.uuid4(),
    )
    return {"credited": event_id}


class Poison(RuntimeError):
    """An error of the handler's that no retry cures."""


def poison(event: dict[str, Any]) -> None:
    credit(event)  # the effect must roll back with the claim
    raise Poison(f"cannot process {event.get('eventId')!r}")


not_callable = 42
