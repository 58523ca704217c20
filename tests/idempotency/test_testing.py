"""idempotency.testing: the helpers users test their consumers with, and that they can fail."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
from django.db import transaction
from django.db.models import F
from django.test import TestCase

from idempotency.decorators import idempotent_handler
from idempotency.testing import (
    Deliveries,
    Delivery,
    SimulatedCrash,
    applied_count,
    assert_applied_once,
    assert_not_applied,
    deliver,
    deliver_after_crash,
    deliver_concurrently,
)
from orders.models import Product
from tests.factories import ProductFactory
from tests.services import ROOT


def stock() -> int:
    return Product.objects.get(product_id="P-1").stock


@idempotent_handler("tests.take_one")
def take_one(event: dict[str, Any]) -> int:
    Product.objects.filter(product_id="P-1").update(stock=F("stock") - 1)
    return stock()


def take_one_unguarded(event: dict[str, Any]) -> None:
    """What the helpers must catch: the same effect with no inbox claim."""
    with transaction.atomic():
        Product.objects.filter(product_id="P-1").update(stock=F("stock") - 1)


@pytest.mark.django_db(transaction=True)
def test_a_crash_then_a_redelivery_applies_a_guarded_handler_once() -> None:
    ProductFactory(product_id="P-1", stock=10)
    outcome = deliver_after_crash(take_one, {"eventId": "e-1"})
    assert isinstance(outcome.deliveries[0].error, SimulatedCrash)
    assert outcome.deliveries[1].result == 9
    outcome.assert_applied_once()
    assert stock() == 9
    assert_applied_once("tests.take_one", "e-1")


@pytest.mark.django_db(transaction=True)
def test_a_crash_drops_the_on_commit_callbacks_of_the_delivery() -> None:
    ProductFactory(product_id="P-1", stock=10)
    sent: list[str] = []

    @idempotent_handler("tests.notify")
    def notify(event: dict[str, Any]) -> None:
        transaction.on_commit(lambda: sent.append(event["eventId"]))

    deliver_after_crash(notify, {"eventId": "e-2"}).assert_applied_once()
    assert sent == ["e-2"]  # the crashed delivery's callback never ran


@pytest.mark.django_db(transaction=True)
def test_an_unguarded_handler_fails_the_assertion() -> None:
    ProductFactory(product_id="P-1", stock=10)
    outcome = deliver_after_crash(take_one_unguarded, {"eventId": "e-3"})
    with pytest.raises(AssertionError, match="applied 0 times"):
        outcome.assert_applied_once()
    assert_not_applied("tests.take_one", "e-3")


@pytest.mark.django_db(transaction=True)
def test_a_handler_that_commits_nothing_cannot_be_crashed() -> None:
    with pytest.raises(AssertionError, match="never committed a transaction"):
        deliver_after_crash(lambda event: None, {"eventId": "e-4"})


@pytest.mark.django_db
def test_racing_deliveries_refuse_to_run_inside_the_test_transaction() -> None:
    with pytest.raises(RuntimeError, match="transactional test"):
        deliver_concurrently(take_one, {"eventId": "e-5"})


@pytest.mark.django_db(transaction=True)
def test_two_racing_deliveries_apply_a_guarded_handler_once(
    deliver_concurrently: Any,
) -> None:
    from django.db import connection

    if connection.vendor != "postgresql":
        pytest.skip("two writers at once need PostgreSQL")
    ProductFactory(product_id="P-1", stock=10)
    outcome = deliver_concurrently(take_one, {"eventId": "e-6"}, times=4)
    outcome.assert_applied_once()
    assert (outcome.processed, outcome.discarded) == (1, 3)
    assert stock() == 9


@pytest.mark.django_db(transaction=True)
def test_two_racing_unguarded_deliveries_fail_the_assertion(deliver_concurrently: Any) -> None:
    from django.db import connection

    if connection.vendor != "postgresql":
        pytest.skip("two writers at once need PostgreSQL")
    ProductFactory(product_id="P-1", stock=10)
    outcome = deliver_concurrently(take_one_unguarded, {"eventId": "e-7"})
    with pytest.raises(AssertionError):
        outcome.assert_applied_once()
    assert stock() == 8


def test_the_outcome_assertion_counts_every_delivery() -> None:
    twice = Deliveries([Delivery(processed=1), Delivery(processed=1)])
    with pytest.raises(AssertionError, match="applied 2 times"):
        twice.assert_applied_once()
    failed = Deliveries([Delivery(processed=1), Delivery(error=ValueError("boom"))])
    with pytest.raises(AssertionError, match="a delivery raised"):
        failed.assert_applied_once()
    failed.assert_applied_once(allow_errors=True)
    uncounted = Deliveries([Delivery(processed=1), Delivery()])
    with pytest.raises(AssertionError, match="2 deliveries ended"):
        uncounted.assert_applied_once()


@pytest.mark.django_db
def test_a_plain_delivery_keeps_what_the_handler_raised() -> None:
    def fails(event: Any) -> None:
        raise ValueError("no")

    outcome = deliver(fails, {"eventId": "e-8"})
    assert isinstance(outcome.error, ValueError)
    assert applied_count("tests.fails", "e-8") == 0


class DjangoTestCaseUse(TestCase):
    """The helpers in a Django TestCase: no pytest fixture needed."""

    def test_crash_and_redelivery(self) -> None:
        ProductFactory(product_id="P-1", stock=3)
        deliver_after_crash(take_one, {"eventId": "e-9"}).assert_applied_once()
        assert_applied_once("tests.take_one", "e-9")
        assert stock() == 2


def test_importing_the_helpers_or_the_app_imports_no_pytest() -> None:
    code = (
        "import sys, django, os; os.environ.setdefault('DJANGO_SETTINGS_MODULE', "
        "'project.settings'); django.setup();"
        "assert 'idempotency.testing' not in sys.modules, 'the app imported its helpers';"
        "import idempotency.testing;"
        "assert 'pytest' not in sys.modules, 'idempotency.testing imported pytest'"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr


def test_the_pytest_entry_point_names_the_plugin_module() -> None:
    """What an installed package registers: the module with both fixtures, under its own name."""
    import importlib

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: pytest's own TOML reader
        import tomli as tomllib

    entry_points = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]
    ((name, target),) = entry_points["pytest11"].items()
    assert name == target  # the conftest's pytest_plugins entry then cannot load it twice
    plugin = importlib.import_module(target)
    assert {"deliver_concurrently", "deliver_after_crash"} <= set(vars(plugin))
