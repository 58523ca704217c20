"""The business logic of each event. Each function runs inside the claim's transaction.

Every final outcome leaves a row keyed by the event's id that outlives the inbox record: an
order, a payment, a ledger entry, or, for a rejection, a :class:`~orders.models.Rejection`.
A redelivery after the inbox was purged finds it and ends the same way, never applied to data
that has changed since.
"""

from __future__ import annotations

import logging
from collections import Counter
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.core.mail import EmailMessage
from django.db import IntegrityError, transaction
from django.db.models import F
from django.utils import timezone

from idempotency.entities import create_once
from idempotency.inbox import current_claim, reject

from .models import (
    ConfirmationEmail,
    Customer,
    LedgerEntry,
    Order,
    OrderItem,
    Payment,
    Product,
    Rejection,
)

logger = logging.getLogger("orders")


class InsufficientStock(Exception):
    def __init__(self, product_id: str) -> None:
        super().__init__(f"insufficient stock for {product_id}")


class OrderNotYetPlaced(Exception):
    """The event names an order that has not arrived yet: retried later, never dropped."""

    def __init__(self, order_id: str) -> None:
        self.order_id = order_id
        super().__init__(f"order {order_id} has not been placed (yet)")


def order_summary(order: Order) -> dict[str, Any]:
    """What the PlaceOrder task returns, and what a duplicate delivery returns again."""
    return {"orderId": order.order_id, "status": order.status, "reason": order.reason}


def place_order(event: dict[str, Any]) -> dict[str, Any]:
    """Create the order and take its stock, or record it as rejected: a final outcome."""
    wanted = Counter[str]()
    for item in event["items"]:
        wanted[item["productId"]] += item["quantity"]
    try:
        order, created = create_once(
            Order,
            event["eventId"],
            defaults={
                "order_id": event["orderId"],
                "requested_customer_id": event["customerId"],
                "status": Order.Status.REJECTED,  # until the stock is taken below
            },
        )
    except IntegrityError:
        # Another event already created this orderId: the producer reused it under a new id.
        return _rejected(
            event, f"order {event['orderId']} already exists", orderId=event["orderId"]
        )
    if not created:
        # The entity key caught a redelivery the inbox no longer remembers (it was purged).
        return order_summary(order)

    customer = Customer.objects.filter(customer_id=event["customerId"]).first()
    products = Product.objects.in_bulk(list(wanted), field_name="product_id")
    missing = sorted(set(wanted) - set(products))
    if customer is None:
        return _reject_order(event, order, f"unknown customer {event['customerId']}")
    if missing:
        return _reject_order(event, order, f"unknown product(s): {', '.join(missing)}")
    try:
        _take_stock(products, wanted)
    except InsufficientStock as exc:
        return _reject_order(event, order, str(exc))

    OrderItem.objects.bulk_create(
        OrderItem(order=order, product=products[pid], quantity=qty, unit_price=products[pid].price)
        for pid, qty in wanted.items()
    )
    order.customer = customer
    order.status = Order.Status.ACCEPTED
    order.total = sum(
        (products[pid].price * qty for pid, qty in wanted.items()), start=Decimal("0.00")
    )
    order.save(update_fields=["customer", "status", "total"])
    if customer.email:
        _emit_order_placed(event, order, customer)
    return order_summary(order)


def _emit_order_placed(event: dict[str, Any], order: Order, customer: Customer) -> None:
    """Store the OrderPlaced message with the order, in its transaction (the outbox).

    Its id is derived from the PlaceOrder event's, so a redelivery that got this far again (its
    first attempt rolled back) emits the same id, and the confirmation consumer's inbox discards
    any copy the relay or the reconciler publishes.
    """
    from idempotency import outbox
    from idempotency.consumers import derived_event_id

    from . import tasks

    placed = {
        "eventId": derived_event_id(event["eventId"], "OrderPlaced"),
        "type": "OrderPlaced",
        "orderId": order.order_id,
        "customerId": customer.customer_id,
        "email": customer.email,
        "total": str(order.total),
    }
    outbox.enqueue(tasks.send_order_confirmation, [placed], event_id=placed["eventId"])


def confirmation_message_id(event_id: str) -> str:
    """The confirmation's ``Message-ID``: derived from the OrderPlaced event's id, so a second
    send of the same confirmation carries the same id (mail clients and providers that
    de-duplicate by it show one)."""
    domain = settings.DEFAULT_FROM_EMAIL.rpartition("@")[2].strip("> ") or "localhost"
    return f"<{event_id}@{domain}>"


def send_order_confirmation(event: dict[str, Any]) -> dict[str, Any]:
    """Email the customer their order's confirmation; record it once the server accepted it.

    At least once, not exactly once: SMTP is outside the transaction. A worker killed after the
    send and before the commit sends it again on the redelivery (with the same Message-ID);
    see docs/consumers.md.
    """
    sent = ConfirmationEmail.objects.filter(original_event_id=event["eventId"]).first()
    if sent is not None:
        # The inbox record was purged and the event came back: sent already, not again.
        return {"orderId": event["orderId"], "messageId": sent.message_id}
    order = Order.objects.get(order_id=event["orderId"])
    message_id = confirmation_message_id(event["eventId"])
    EmailMessage(
        subject=f"Your order {order.order_id}",
        body=f"Thank you: your order {order.order_id} ({event['total']}) is accepted.",
        to=[event["email"]],
        headers={"Message-ID": message_id},
    ).send()
    # Recorded after the server accepted it: a send that failed leaves nothing, and the
    # delivery is tried again.
    ConfirmationEmail.objects.create(
        original_event_id=event["eventId"],
        order=order,
        recipient=event["email"],
        message_id=message_id,
    )
    return {"orderId": order.order_id, "messageId": message_id}


def _take_stock(products: dict[str, Product], wanted: Counter[str]) -> None:
    # A savepoint, so running short on the second product gives back the first one's units.
    # Rows are locked in product-id order so two orders can never deadlock on each other.
    with transaction.atomic():
        for pid in sorted(wanted):
            taken = Product.objects.filter(pk=products[pid].pk, stock__gte=wanted[pid]).update(
                stock=F("stock") - wanted[pid]
            )
            if not taken:
                raise InsufficientStock(pid)


def _reject_order(event: dict[str, Any], order: Order, reason: str) -> dict[str, Any]:
    order.status = Order.Status.REJECTED
    order.reason = reason
    order.save(update_fields=["status", "reason"])
    return _rejected(event, reason, orderId=order.order_id)


def _rejected(event: dict[str, Any], reason: str, **ids: Any) -> dict[str, Any]:
    """Record a final negative outcome, on the inbox and in a Rejection that outlives it."""
    result = {**ids, "status": "rejected", "reason": reason}
    claim = current_claim()
    create_once(
        Rejection,
        event["eventId"],
        defaults={
            "consumer": claim.consumer if claim is not None else "",
            "reason": reason,
            "result": result,
        },
    )
    reject(reason)
    logger.info("rejected: %s", reason)
    return result


def _rejected_before(event: dict[str, Any]) -> dict[str, Any] | None:
    """The result of this event's earlier rejection, rejected again; ``None`` if it has none."""
    earlier = Rejection.objects.filter(original_event_id=event["eventId"]).first()
    if earlier is None:
        return None
    # Redelivered after its inbox record was purged: the outcome was final.
    reject(earlier.reason)
    return dict(earlier.result) or {"status": "rejected", "reason": earlier.reason}


def _locked_order(order_id: str) -> Order:
    # FOR UPDATE: concurrent payments of one order add up instead of overwriting each other's
    # status decision.
    order = Order.objects.select_for_update().filter(order_id=order_id).first()
    if order is None:
        raise OrderNotYetPlaced(order_id)
    return order


def payment_received(event: dict[str, Any]) -> dict[str, Any]:
    """Record the payment and add it to the order's paid amount; paid once fully covered."""
    if (earlier := _rejected_before(event)) is not None:
        return earlier
    order = _locked_order(event["orderId"])
    amount = Decimal(event["amount"])
    ids = {"orderId": order.order_id, "paymentId": event["paymentId"]}
    if order.status == Order.Status.REJECTED:
        return _rejected(event, f"order {order.order_id} was rejected: {order.reason}", **ids)
    if event["currency"] != Order.CURRENCY:
        return _rejected(
            event, f"currency {event['currency']} is not the order's {Order.CURRENCY}", **ids
        )
    payment, created = Payment.objects.get_or_create(
        order=order,
        payment_id=event["paymentId"],
        defaults={
            "amount": amount,
            "currency": event["currency"],
            "original_event_id": event["eventId"],
        },
    )
    if not created and str(payment.original_event_id) == str(event["eventId"]):
        # This very event, redelivered after its inbox record was purged: already applied.
        return {**ids, "status": order.status, "paidAmount": str(order.paid_amount)}
    if not created:
        # The business key caught what the inbox could not: the same payment under a new id.
        return _rejected(
            event,
            f"payment {payment.payment_id} was already applied by event "
            f"{payment.original_event_id}",
            **ids,
        )
    Order.objects.filter(pk=order.pk).update(paid_amount=F("paid_amount") + amount)
    order.refresh_from_db(fields=["paid_amount"])
    if order.status == Order.Status.ACCEPTED and order.paid_amount >= order.total:
        order.status = Order.Status.PAID
        order.save(update_fields=["status"])
    return {**ids, "status": order.status, "paidAmount": str(order.paid_amount)}


def debit_account(event: dict[str, Any]) -> dict[str, Any]:
    """Deduct from a customer's balance once, never below zero, and write it in the ledger."""
    amount = Decimal(event["amount"])
    customer_id = event["customerId"]
    applied = LedgerEntry.objects.filter(original_event_id=event["eventId"]).first()
    if applied is not None:
        # Redelivered after its inbox record was purged: the ledger entry remembers it.
        return {
            "customerId": customer_id,
            "status": "debited",
            "balance": str(applied.balance_after),
        }
    if (earlier := _rejected_before(event)) is not None:
        # Refused before, refused again: even if the balance would cover it now.
        return earlier
    debited = Customer.objects.filter(customer_id=customer_id, balance__gte=amount).update(
        balance=F("balance") - amount
    )
    if not debited:
        if not Customer.objects.filter(customer_id=customer_id).exists():
            return _rejected(event, f"unknown customer {customer_id}", customerId=customer_id)
        return _rejected(
            event,
            f"insufficient balance to debit {amount} from {customer_id}",
            customerId=customer_id,
        )
    customer = Customer.objects.get(customer_id=customer_id)
    LedgerEntry.objects.create(
        customer=customer,
        amount=-amount,
        reason=event["reason"],
        balance_after=customer.balance,
        original_event_id=event["eventId"],
    )
    return {"customerId": customer_id, "status": "debited", "balance": str(customer.balance)}


def ship_order(event: dict[str, Any]) -> dict[str, Any]:
    """Set the tracking number of a paid order: naturally idempotent, recorded all the same."""
    if (earlier := _rejected_before(event)) is not None:
        return earlier  # an unpaid order's shipment stays refused once the order is paid
    order = _locked_order(event["orderId"])
    ids = {"orderId": order.order_id}
    if order.status not in (Order.Status.PAID, Order.Status.SHIPPED):
        why = (
            f"it was rejected: {order.reason}"
            if order.status == Order.Status.REJECTED
            else (f"it is not paid ({order.paid_amount} of {order.total})")
        )
        return _rejected(event, f"order {order.order_id} cannot ship: {why}", **ids)
    order.status = Order.Status.SHIPPED
    order.tracking_number = event["trackingNumber"]
    order.shipped_at = order.shipped_at or timezone.now()
    order.save(update_fields=["status", "tracking_number", "shipped_at"])
    return {**ids, "status": order.status, "trackingNumber": order.tracking_number}
