"""Scenario 22: a consumer that publishes, through a real worker, SIGKILLed at three points.

PlaceOrder, once accepted for a customer with an email address, stores OrderPlaced in the
outbox in its own transaction (an id derived from its event's); the message is published after
the commit, or by the relay (``relay_outbox --forever`` runs next to the worker, as in
scripts/run.sh); the confirmation consumer emails the customer through Django's SMTP backend to
an aiosmtpd server the test runs on a loopback port, with a ``Message-ID`` derived from the
OrderPlaced id, and records the send after the server accepted it. A pool process is SIGKILLed
through the suite's fault hooks (tests/faults/hooks.py):

22a
    after PlaceOrder's commit, before OrderPlaced is published (``before-publish``): the row is
    pending, the redelivered PlaceOrder is discarded, and the relay publishes OrderPlaced.
22b
    inside PlaceOrder's transaction, the OrderPlaced row written (``before-commit``): both roll
    back, and the redelivery stores and publishes the same derived id again.
22c
    between the confirmation's send and its commit (``before-commit`` of OrderPlaced): the
    email went out, its record rolled back, and the redelivery sends it again.

The database effects (the order, OrderPlaced's outbox row and inbox record, the recorded send)
exist exactly once per order in every case: 0 lost, 0 doubled. Emails are counted per
Message-ID: one each in 22a and 22b; in 22c every kill sends a second email, which the scenario
counts and asserts, because an SMTP send cannot commit with the database (docs/consumers.md).
"""

from __future__ import annotations

import email
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from idempotency.consumers import derived_event_id
from idempotency.models import OutboxMessage, ProcessedEvent
from orders.models import ConfirmationEmail, Customer
from tests.faults.harness import FAULTS_SETTINGS, Scenario, free_tcp_port
from tests.faults.ledger import CONFIRM, CUSTOMERS, PLACE, Events

aiosmtpd_controller = pytest.importorskip("aiosmtpd.controller")

pytestmark = [pytest.mark.faults, pytest.mark.services]

NewScenario = Callable[[str, str], Scenario]

ORDERS = 10
#: Orders whose delivery is killed: two of the ten, so each case is seen more than once.
TARGETS = (2, 6)
#: The domain of DEFAULT_FROM_EMAIL in tests/faults/settings.py (FAULTS_SMTP_PORT).
DOMAIN = "shop.example"

#: case: (scenario number, title, kill point, whether the point is named by the OrderPlaced id).
CASES = {
    "after-commit-before-publish": (
        "22a",
        "a publishing consumer SIGKILLed after its commit, before the publish (the relay's)",
        "before-publish",
        True,
    ),
    "inside-the-transaction": (
        "22b",
        "a publishing consumer SIGKILLed inside its transaction, OrderPlaced stored",
        "before-commit",
        False,
    ),
    "between-send-and-commit": (
        "22c",
        "the confirmation consumer SIGKILLed between the email's send and its commit",
        "before-commit",
        True,
    ),
}


class SMTPInbox:
    """What the SMTP server accepted: the Message-ID and recipients of each email."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.received: list[tuple[str, str]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        message = email.message_from_bytes(envelope.content)
        with self.lock:
            self.received.append((str(message["Message-ID"]), str(message["To"])))
        return "250 OK"

    def per_message_id(self) -> Counter[str]:
        with self.lock:
            return Counter(message_id for message_id, _ in self.received)


@pytest.fixture
def smtp() -> Iterator[tuple[SMTPInbox, int]]:
    inbox = SMTPInbox()
    port = free_tcp_port()
    server = aiosmtpd_controller.Controller(inbox, hostname="127.0.0.1", port=port)
    server.start()
    try:
        yield inbox, port
    finally:
        server.stop()


def message_id(order: dict[str, Any]) -> str:
    return f"<{derived_event_id(order['eventId'], 'OrderPlaced')}@{DOMAIN}>"


@pytest.mark.parametrize("case", list(CASES))
def test_publishing_consumer_killed(
    scenario: NewScenario, smtp: tuple[SMTPInbox, int], case: str
) -> None:
    number, title, point, downstream = CASES[case]
    inbox, port = smtp
    s = scenario(number, title)
    for customer_id in CUSTOMERS:
        Customer.objects.filter(customer_id=customer_id).update(
            email=f"{customer_id.lower()}@example.com"
        )
    s.ledger.emailed = set(CUSTOMERS)
    events = Events(seed=22)
    orders = [events.place() for _ in range(ORDERS)]
    targets = [orders[i] for i in TARGETS]
    for order in targets:
        placed = derived_event_id(order["eventId"], "OrderPlaced")
        s.arm(placed if downstream else order["eventId"], point, "kill")
    env = {**FAULTS_SETTINGS, "FAULTS_SMTP_PORT": str(port)}
    s.worker(concurrency=2, env=env)
    s.relay()
    # Two PlaceOrders published twice under new task ids (a producer's retry): discarded, and
    # they emit nothing more.
    s.send_all([(PLACE, order, None) for order in [*orders, orders[0], orders[5]]])
    s.drain(timeout=120)
    emails = inbox.per_message_id()
    wanted = {message_id(order) for order in orders}
    twice = sorted(m for m, n in emails.items() if n > 1)
    s.notes.append(
        f"{sum(emails.values())} emails received for {ORDERS} OrderPlaced events, "
        f"{len(twice)} of them sent twice (the same Message-ID) after {len(targets)} kills at "
        f"{point}; {len(wanted - set(emails))} never sent"
    )
    s.verify()
    assert s.count("killed") == len(targets)
    assert set(emails) == wanted, "an email went to no order, or an order got none"
    for order in targets:
        # The delivery the kill cut short came back: PlaceOrder's (22a, 22b; in 22a its publish
        # after commit is what was killed), OrderPlaced's (22c).
        killed = order["eventId"]
        if case == "between-send-and-commit":
            killed = derived_event_id(order["eventId"], "OrderPlaced")
        assert s.count("received", killed) == 2, killed
    placed_ids = [derived_event_id(order["eventId"], "OrderPlaced") for order in orders]
    assert sorted(
        str(e) for e in ConfirmationEmail.objects.values_list("original_event_id", flat=True)
    ) == sorted(placed_ids)
    assert ProcessedEvent.objects.for_consumer(CONFIRM).count() == ORDERS
    assert not OutboxMessage.objects.filter(task_name=CONFIRM).pending().exists()
    if case == "between-send-and-commit":
        # At least once: each kill between the send and the commit sent the email again.
        assert twice == sorted(message_id(order) for order in targets)
        assert all(emails[message_id(order)] == 2 for order in targets), emails
    else:
        assert twice == [], "no email may go twice when the kill is before the send"
        if case == "after-commit-before-publish":
            # The killed process never published OrderPlaced: the relay did, and the PlaceOrder
            # that came back was discarded by the inbox.
            for order in targets:
                assert s.count("discarded", order["eventId"]) == 1
