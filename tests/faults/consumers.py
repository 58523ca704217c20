"""A second consumer of the order events, for the fault-injection suite only.

The worker loads it with ``--include tests.faults.consumers``. It keeps its own inbox records
(consumer ``tests.audit``) next to ``orders.tasks.place_order``'s for the same event ids, and
its effect can be counted: it credits the ``AUDIT`` customer one unit per event and writes a
ledger entry whose reason names the event.
"""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Any

from django.db.models import F

from idempotency.celery import idempotent_task
from orders.models import Customer, LedgerEntry

CONSUMER = "tests.audit"
TASK_NAME = "tests.faults.consumers.audit_event"
CUSTOMER_ID = "AUDIT"
CREDIT = Decimal("1.00")
#: Ledger entries of the audit consumer get an id of their own, derived from the event's.
NAMESPACE = uuid.UUID("5b0c2f8e-93f4-4a53-b0a4-1e7f3a0f6c11")


def reason_for(event_id: str) -> str:
    return f"audit {event_id}"


def record_audit(event: dict[str, Any]) -> dict[str, Any]:
    event_id = str(event["eventId"])
    Customer.objects.filter(customer_id=CUSTOMER_ID).update(balance=F("balance") + CREDIT)
    customer = Customer.objects.get(customer_id=CUSTOMER_ID)
    LedgerEntry.objects.create(
        customer=customer,
        amount=CREDIT,
        reason=reason_for(event_id),
        balance_after=customer.balance,
        original_event_id=uuid.uuid5(NAMESPACE, event_id),
    )
    return {"audited": event_id}


@idempotent_task(consumer=CONSUMER, name=TASK_NAME)
def audit_event(event: dict[str, Any]) -> dict[str, Any]:
    # A global looked up at call time, so the fault hooks can wrap it.
    return record_audit(event)
