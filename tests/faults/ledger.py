"""What a scenario sent, what should therefore exist, and a check of what does.

The ledger is the test's own record of every message it published. From the distinct events in
it the expected end state follows: one inbox record and one effect per (consumer, event id), and
totals (stock, balances, paid amounts, order statuses) computed as if each event had been
applied exactly once. :func:`inspect` compares that with the database and reports, rather than
raises, every difference, so a scenario can publish its numbers before it asserts.
"""

from __future__ import annotations

import random
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from django.apps import apps

from idempotency.consumers import derived_event_id
from idempotency.models import OutboxMessage, Outcome, ProcessedEvent
from orders.models import ConfirmationEmail, Customer, LedgerEntry, Order, Payment, Product
from tests.factories import (
    debit_account_event,
    order_shipped_event,
    payment_received_event,
    place_order_event,
)
from tests.faults import consumers

PLACE = "orders.tasks.place_order"
PAY = "orders.tasks.payment_received"
DEBIT = "orders.tasks.debit_account"
SHIP = "orders.tasks.ship_order"
#: The consumer of OrderPlaced, which PlaceOrder emits through the outbox for a customer with
#: an email address (none of the seeded customers has one, unless a scenario gives it).
CONFIRM = "orders.tasks.send_order_confirmation"
AUDIT = consumers.CONSUMER

#: The consumer name of each task (the task name, unless the decorator names another).
CONSUMER_OF_TASK = {
    PLACE: PLACE,
    PAY: PAY,
    DEBIT: DEBIT,
    SHIP: SHIP,
    CONFIRM: CONFIRM,
    consumers.TASK_NAME: AUDIT,
}

PRICES = {"FP-1": Decimal("10.00"), "FP-2": Decimal("25.00"), "FP-3": Decimal("4.50")}
CUSTOMERS = ("FC-1", "FC-2", "FC-3")
INITIAL_STOCK = 1_000_000
INITIAL_BALANCE = Decimal("1000000.00")


def seed_catalogue() -> None:
    """Products and customers with room for every event a scenario sends: nothing is rejected."""
    for product_id, price in PRICES.items():
        Product.objects.create(
            product_id=product_id, name=product_id, price=price, stock=INITIAL_STOCK
        )
    for customer_id in CUSTOMERS:
        Customer.objects.create(customer_id=customer_id, balance=INITIAL_BALANCE)
    Customer.objects.create(customer_id=consumers.CUSTOMER_ID, balance=Decimal("0.00"))


class Events:
    """Events of every type the example handles, reproducible from a seed."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def place(self) -> dict[str, Any]:
        products = self.rng.sample(sorted(PRICES), k=self.rng.randint(1, 2))
        return place_order_event(
            eventId=str(uuid.UUID(int=self.rng.getrandbits(128), version=4)),
            orderId=f"FO-{self.rng.getrandbits(48):012x}",
            customerId=self.rng.choice(CUSTOMERS),
            items=[{"productId": p, "quantity": self.rng.randint(1, 3)} for p in products],
        )

    def debit(self) -> dict[str, Any]:
        return debit_account_event(
            eventId=str(uuid.UUID(int=self.rng.getrandbits(128), version=4)),
            customerId=self.rng.choice(CUSTOMERS),
            amount=str(Decimal(self.rng.randint(1, 999)) / 100),
            reason="fault suite",
        )

    def pay(self, order: dict[str, Any]) -> dict[str, Any]:
        """A payment of the order's whole total: the order becomes paid."""
        return payment_received_event(
            eventId=str(uuid.UUID(int=self.rng.getrandbits(128), version=4)),
            orderId=order["orderId"],
            paymentId=f"FPAY-{self.rng.getrandbits(48):012x}",
            amount=str(order_total(order)),
        )

    def ship(self, order: dict[str, Any]) -> dict[str, Any]:
        return order_shipped_event(
            eventId=str(uuid.UUID(int=self.rng.getrandbits(128), version=4)),
            orderId=order["orderId"],
            trackingNumber=f"FTRK-{self.rng.getrandbits(32):08x}",
        )


def order_total(event: dict[str, Any]) -> Decimal:
    return sum(
        (PRICES[item["productId"]] * item["quantity"] for item in event["items"]),
        start=Decimal("0.00"),
    )


@dataclass
class Sent:
    task: str
    event: dict[str, Any]
    task_id: str

    @property
    def consumer(self) -> str:
        return CONSUMER_OF_TASK[self.task]

    @property
    def key(self) -> tuple[str, str]:
        # A poison message may have no event id at all: its key is then (consumer, "").
        return (self.consumer, str(self.event.get("eventId", "")))


@dataclass
class Ledger:
    sent: list[Sent] = field(default_factory=list)
    #: (consumer, event id) pairs the scenario expects to end as dead letters, not effects.
    #: ``("", "")`` is a message no task could read (undecodable): it names neither.
    expected_dead: set[tuple[str, str]] = field(default_factory=set)
    #: Messages expected in the broker's dead-letter queue, when not one per expected dead
    #: letter (an undecodable message is acknowledged, not dead-lettered by the broker; a
    #: re-driven one stays there).
    broker_dead: int | None = None
    #: Dead letters expected on top of the effects, per (task name, event id): a duplicate whose
    #: delivery failed after the first delivery had applied the event.
    extra_dead: Counter[tuple[str, str]] = field(default_factory=Counter)
    #: Task ids of the outbox messages expected to end failed (refused by every publish).
    failed_outbox: set[str] = field(default_factory=set)
    #: Customers the scenario gave an email address: each order of theirs emits OrderPlaced,
    #: whose confirmation is an effect of its own (derived here, not read from the outbox).
    emailed: set[str] = field(default_factory=set)

    def record(self, task: str, event: dict[str, Any], task_id: str) -> None:
        self.sent.append(Sent(task, event, task_id))

    def distinct(self) -> dict[tuple[str, str], dict[str, Any]]:
        found = {s.key: s.event for s in self.sent}
        for (consumer, event_id), event in list(found.items()):
            if consumer == PLACE and event.get("customerId") in self.emailed:
                placed = derived_event_id(event_id, "OrderPlaced")
                found[(CONFIRM, placed)] = {"eventId": placed, "orderId": event["orderId"]}
        return found

    def expected_effects(self) -> dict[tuple[str, str], dict[str, Any]]:
        return {k: e for k, e in self.distinct().items() if k not in self.expected_dead}

    def expect_dead_letter(self, consumer: str, event_id: str) -> None:
        self.expected_dead.add((consumer, event_id))

    def expect_effect(self, consumer: str, event_id: str) -> None:
        """A dead letter re-driven after a fix: its effect is expected after all."""
        self.expected_dead.discard((consumer, event_id))

    def expect_extra_dead_letters(self, task: str, event_id: str, count: int) -> None:
        self.extra_dead[(task, event_id)] += count

    def expected_broker_dead(self) -> int:
        if self.broker_dead is not None:
            return self.broker_dead
        return len(self.expected_dead) + sum(self.extra_dead.values())


@dataclass
class Inspection:
    """The differences between the ledger's expectations and the database."""

    effects: int = 0
    lost: int = 0
    doubled: int = 0
    dead_letters: int = 0
    failed_outbox: int = 0
    problems: list[str] = field(default_factory=list)

    def problem(self, text: str, *, lost: int = 0, doubled: int = 0) -> None:
        self.problems.append(text)
        self.lost += lost
        self.doubled += doubled


def dead_letter_rows() -> list[tuple[str, str]]:
    """(task name, event id) of the dead letters the app stored and nobody re-drove yet."""
    try:
        model = apps.get_model("idempotency", "DeadLetter")
    except LookupError:
        return []
    letters = model.objects.all()
    if any(f.name == "redriven_at" for f in model._meta.get_fields()):
        # A re-driven dead letter is settled: its event is expected as an effect instead.
        letters = letters.filter(redriven_at__isnull=True)
    return [(str(t), str(e)) for t, e in letters.values_list("task_name", "event_id")]


def _compare(result: Inspection, what: str, actual: Decimal | int, expected: Decimal | int) -> None:
    if actual < expected:
        result.problem(f"{what} is {actual}, expected {expected}: applied too often", doubled=1)
    elif actual > expected:
        result.problem(f"{what} is {actual}, expected {expected}: an effect is missing", lost=1)


def inspect(ledger: Ledger, broker_dead: int | None = None) -> Inspection:
    """Check every invariant of the scenario against the database.

    *broker_dead* is the number of messages in the broker's dead-letter queue, where it has one.
    """
    result = Inspection()
    expected = ledger.expected_effects()
    by_type: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for (consumer, _), event in expected.items():
        by_type[consumer].append(event)

    # One inbox record per (consumer, event id), processed, and nothing the ledger did not send.
    inbox = Counter(ProcessedEvent.objects.values_list("consumer", "event_id"))
    outcomes = dict(
        ((c, e), o)
        for c, e, o in ProcessedEvent.objects.values_list("consumer", "event_id", "outcome")
    )
    for key in expected:
        if inbox[key] == 0:
            # Not counted as lost here: a missing effect is, below.
            result.problem(f"no inbox record for {key}")
        elif outcomes[key] != Outcome.PROCESSED:
            result.problem(f"{key} ended {outcomes[key]}, not processed")
    for key, count in inbox.items():
        if key not in expected:
            result.problem(f"an inbox record the ledger does not expect: {key}")
        if count > 1:
            result.problem(f"{count} inbox records for {key}", doubled=count - 1)

    # One effect per event, and every business row named by an inbox record (and vice versa).
    orders = Counter(str(e) for e in Order.objects.values_list("original_event_id", flat=True))
    payments = Counter(str(e) for e in Payment.objects.values_list("original_event_id", flat=True))
    audit = Customer.objects.get(customer_id=consumers.CUSTOMER_ID)
    audits = Counter(
        r.removeprefix("audit ")
        for r in LedgerEntry.objects.filter(customer=audit).values_list("reason", flat=True)
    )
    debits = Counter(
        str(e)
        for e in LedgerEntry.objects.exclude(customer=audit).values_list(
            "original_event_id", flat=True
        )
    )
    confirmations = Counter(
        str(e) for e in ConfirmationEmail.objects.values_list("original_event_id", flat=True)
    )
    rows = {PLACE: orders, PAY: payments, DEBIT: debits, AUDIT: audits, CONFIRM: confirmations}
    tracking = dict(Order.objects.values_list("order_id", "tracking_number"))
    for (consumer, event_id), event in expected.items():
        if consumer == SHIP:
            count = int(tracking.get(event["orderId"]) == event["trackingNumber"])
        else:
            count = rows[consumer][event_id]
        if count == 0:
            result.problem(f"no effect of {consumer} {event_id}", lost=1)
        elif count > 1:
            result.problem(f"{count} effects of {consumer} {event_id}", doubled=count - 1)
        elif inbox[(consumer, event_id)]:
            result.effects += 1
    for consumer, counter in rows.items():
        for event_id in counter:
            if (consumer, event_id) not in inbox:
                result.problem(f"the {consumer} row of event {event_id} has no inbox record")
    for consumer, event_id in inbox:
        if consumer in rows and rows[consumer][event_id] == 0:
            result.problem(f"the inbox record {consumer} {event_id} has no business row")

    # The outgoing OrderPlaced of each order: stored once, with the order, and published.
    emitted = Counter(
        str(e)
        for e in OutboxMessage.objects.filter(task_name=CONFIRM).values_list("event_id", flat=True)
    )
    for consumer, event_id in expected:
        if consumer == CONFIRM and emitted[event_id] != 1:
            result.problem(f"{emitted[event_id]} outbox messages for OrderPlaced {event_id}")
    unpublished = OutboxMessage.objects.filter(task_name=CONFIRM).pending().count()
    if unpublished:
        result.problem(
            f"{unpublished} OrderPlaced outbox messages never published", lost=unpublished
        )

    # Totals, computed as if each distinct event had been applied once.
    stock = dict.fromkeys(PRICES, INITIAL_STOCK)
    for event in by_type[PLACE]:
        for item in event["items"]:
            stock[item["productId"]] -= item["quantity"]
    for product_id, actual in Product.objects.values_list("product_id", "stock"):
        _compare(result, f"the stock of {product_id}", actual, stock[product_id])
    balance = dict.fromkeys(CUSTOMERS, INITIAL_BALANCE)
    for event in by_type[DEBIT]:
        balance[event["customerId"]] -= Decimal(event["amount"])
    for customer_id, actual in Customer.objects.values_list("customer_id", "balance"):
        if customer_id == consumers.CUSTOMER_ID:
            want = consumers.CREDIT * len(by_type[AUDIT])
            # A credit: more than expected means applied too often.
            _compare(result, "the audit balance", -actual, -want)
        else:
            _compare(result, f"the balance of {customer_id}", actual, balance[customer_id])
    paid: dict[str, Decimal] = defaultdict(Decimal)
    for event in by_type[PAY]:
        paid[event["orderId"]] += Decimal(event["amount"])
    shipped = {event["orderId"] for event in by_type[SHIP]}
    placed = {event["orderId"]: event for event in by_type[PLACE]}
    for order in Order.objects.all():
        placing = placed.get(order.order_id)
        if placing is None:
            continue
        _compare(
            result,
            f"the paid amount of {order.order_id}",
            -order.paid_amount,
            -paid[order.order_id],
        )
        if order.total != order_total(placing):
            result.problem(f"{order.order_id} totals {order.total}, not {order_total(placing)}")
        want_status = (
            Order.Status.SHIPPED
            if order.order_id in shipped
            else Order.Status.PAID
            if paid[order.order_id] >= order.total
            else Order.Status.ACCEPTED
        )
        if order.status != want_status:
            result.problem(f"{order.order_id} is {order.status}, expected {want_status}")

    # Dead letters: exactly those the scenario expects (none, unless it says otherwise).
    task_of = {consumer: task for task, consumer in CONSUMER_OF_TASK.items()}
    stored = Counter(dead_letter_rows())
    wanted = Counter(
        (task_of.get(consumer, consumer), event_id) for consumer, event_id in ledger.expected_dead
    )
    wanted.update(ledger.extra_dead)
    if stored != wanted:
        result.problem(
            f"dead letters stored {dict(stored)}, expected {dict(wanted)}",
            lost=max(0, len(wanted) - len(stored)),
        )
    if broker_dead is not None and broker_dead != ledger.expected_broker_dead():
        result.problem(
            f"{broker_dead} messages in the dead-letter queue, "
            f"expected {ledger.expected_broker_dead()}"
        )
    result.dead_letters = max(sum(stored.values()), broker_dead or 0)

    # Outbox messages refused for good: exactly those expected, each with its reason.
    failed = dict(OutboxMessage.objects.failed().values_list("task_id", "last_error"))
    failed_ids = {str(task_id) for task_id in failed}
    if failed_ids != ledger.failed_outbox:
        result.problem(
            f"failed outbox messages {sorted(failed_ids)}, expected {sorted(ledger.failed_outbox)}",
            lost=len(failed_ids - ledger.failed_outbox),
        )
    for task_id, error in failed.items():
        if not error:
            result.problem(f"the failed outbox message {task_id} gives no reason")
    result.failed_outbox = len(failed_ids)
    return result
