"""The inbox on a database of its own (17.2): the claim refuses writes elsewhere while it is open.

Two real PostgreSQL databases: the test database and a second one, created and migrated here
under its own alias, with the idempotency app routed to it where the scenario needs it.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, connection, connections, transaction
from django.db.models import F
from django.test import override_settings

from idempotency.checks import check_guard_tables_together
from idempotency.decorators import run_once
from idempotency.exceptions import IdempotencyConfigurationError
from idempotency.inbox import idempotent
from idempotency.models import ProcessedEvent
from orders.models import Customer
from tests.services import in_thread, unavailable

OTHER = "inbox_other"

pytestmark = [
    pytest.mark.services,
    pytest.mark.django_db(transaction=True, databases=[DEFAULT_DB_ALIAS, OTHER]),
]


@pytest.fixture(scope="module", autouse=True)
def other_database(
    django_db_setup: None,
    django_db_blocker: Any,
) -> Iterator[str]:
    """A second PostgreSQL database, migrated, under the alias OTHER for this module only."""
    if connection.vendor != "postgresql":
        unavailable(f"the tests run on {connection.vendor}; two PostgreSQL databases are needed")
    config = copy.deepcopy(connections.settings[DEFAULT_DB_ALIAS])
    name = f"{config['NAME']}_other"  # e.g. test_idem_inbox_other: unique per test database
    config["NAME"] = name
    config["TEST"] = {**config.get("TEST", {}), "NAME": name, "MIRROR": None}
    settings.DATABASES[OTHER] = config  # the same dict as connections.settings
    with django_db_blocker.unblock():
        try:
            connections[OTHER].creation.create_test_db(
                verbosity=0, autoclobber=True, serialize=False
            )
            yield OTHER
        finally:
            connections[OTHER].creation.destroy_test_db(name, verbosity=0)
            connections[OTHER].close()
            del connections[OTHER]
            del settings.DATABASES[OTHER]


class InboxElsewhere:
    """The router of 17.2: the idempotency app on the second database, the rest on default."""

    def db_for_write(self, model: type, **hints: Any) -> str | None:
        return OTHER if model._meta.app_label == "idempotency" else None

    db_for_read = db_for_write


def balance(customer_id: str) -> Decimal:
    return Customer.objects.using(DEFAULT_DB_ALIAS).get(customer_id=customer_id).balance


def rows(alias: str) -> int:
    return ProcessedEvent.objects.using(alias).count()


def test_a_write_to_another_database_inside_a_claim_is_refused_before_it_runs() -> None:
    with (
        pytest.raises(IdempotencyConfigurationError, match=OTHER) as info,
        idempotent("billing", "e-1"),
    ):
        ProcessedEvent.objects.using(OTHER).create(consumer="elsewhere", event_id="x")
    assert "allow_writes_to" in str(info.value)
    assert rows(OTHER) == 0, "the refused statement ran"
    assert rows(DEFAULT_DB_ALIAS) == 0, "the claim was not rolled back"
    assert not connection.in_atomic_block
    assert connections[OTHER].execute_wrappers == []
    # After the claim, the other database takes writes again.
    ProcessedEvent.objects.using(OTHER).create(consumer="elsewhere", event_id="x")
    assert rows(OTHER) == 1


def test_the_split_inbox_of_17_2_cannot_double_debit() -> None:
    Customer.objects.create(customer_id="C-1", balance=Decimal("100.00"))
    event = {"eventId": "debit-1", "customer": "C-1", "amount": "10.00"}

    def debit() -> None:
        Customer.objects.filter(customer_id="C-1").update(balance=F("balance") - 10)

    with override_settings(DATABASE_ROUTERS=[InboxElsewhere()]):
        assert check_guard_tables_together(), "the check says nothing about the split"
        for _delivery in range(2):  # the first delivery, then its redelivery
            with pytest.raises(IdempotencyConfigurationError, match="default"):
                run_once("billing.debit", event, debit)
        assert rows(OTHER) == 0
    assert balance("C-1") == Decimal("100.00"), "a debit ran outside the claim's transaction"


def test_a_consumer_claims_with_the_handlers_database() -> None:
    # The documented way out for a project with several databases: using= per consumer.
    Customer.objects.create(customer_id="C-1", balance=Decimal("100.00"))
    event = {"eventId": "debit-1", "customer": "C-1", "amount": "10.00"}

    def debit() -> None:
        Customer.objects.filter(customer_id="C-1").update(balance=F("balance") - 10)

    with override_settings(DATABASE_ROUTERS=[InboxElsewhere()]):
        for _delivery in range(3):
            run_once("billing.debit", event, debit, using=DEFAULT_DB_ALIAS)
    assert balance("C-1") == Decimal("90.00")
    assert rows(DEFAULT_DB_ALIAS) == 1


def test_allow_writes_to_opts_out_per_alias() -> None:
    with idempotent("billing", "e-1", allow_writes_to=[OTHER]):
        ProcessedEvent.objects.using(OTHER).create(consumer="audit", event_id="e-1")
    assert rows(OTHER) == 1
    assert rows(DEFAULT_DB_ALIAS) == 1


def test_reads_and_after_commit_writes_elsewhere_are_allowed() -> None:
    ProcessedEvent.objects.using(OTHER).create(consumer="seen", event_id="e-0")
    with idempotent("billing", "e-1") as claim:
        assert not claim.duplicate
        assert ProcessedEvent.objects.using(OTHER).filter(consumer="seen").exists()
        with connections[OTHER].cursor() as cursor:
            cursor.execute("SELECT count(*) FROM idempotency_processedevent")
        # Runs once the claim has committed: nothing left to keep consistent with.
        transaction.on_commit(
            lambda: ProcessedEvent.objects.using(OTHER).create(consumer="after", event_id="e-1")
        )
    assert ProcessedEvent.objects.using(OTHER).filter(consumer="after").exists()


def test_a_duplicate_does_not_guard() -> None:
    with idempotent("billing", "e-1"):
        pass
    with idempotent("billing", "e-1") as claim:
        assert claim.duplicate
        ProcessedEvent.objects.using(OTHER).create(consumer="dup", event_id="e-1")
    assert rows(OTHER) == 1


def test_the_guard_is_per_thread_and_removed_after_each_claim() -> None:
    errors: list[BaseException] = []

    def other_thread_writes() -> None:
        ProcessedEvent.objects.using(OTHER).create(consumer="thread", event_id="t-1")

    with idempotent("billing", "e-1"):
        thread = in_thread(other_thread_writes, errors)
        thread.join(20)
    assert not errors, errors  # another worker thread's connections are its own
    for n in range(3):
        with idempotent("billing", f"n-{n}"):
            pass
    assert connections[OTHER].execute_wrappers == []
    assert connections[DEFAULT_DB_ALIAS].execute_wrappers == []
