from __future__ import annotations

from decimal import Decimal

import pytest
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from tests.factories import CustomerFactory, ProductFactory, UserFactory
from tests.services import required

# Shared fixtures kept in modules of their own.
# idempotency.testing's plugin is registered by its entry point once the package is installed;
# from the source tree it is listed here.
pytest_plugins = ["tests.replica", "tests.sqs", "idempotency.testing.pytest_plugin"]


@pytest.fixture(autouse=True)
def fresh_duplicate_rates() -> None:
    """Each test starts as a new process does: the claim's duplicate estimates at zero, so the
    statements a test counts do not depend on the tests run before it.
    """
    from idempotency.inbox.statements import forget_duplicate_rates

    forget_duplicate_rates()


@pytest.fixture
def user(db):  # type: ignore[no-untyped-def]
    return UserFactory(username="producer", is_superuser=True, is_staff=True)


@pytest.fixture
def api_client(user) -> APIClient:  # type: ignore[no-untyped-def]
    client = APIClient()
    token, _ = Token.objects.get_or_create(user=user)
    client.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")
    return client


@pytest.fixture
def catalogue(db):  # type: ignore[no-untyped-def]
    """The demo products and customers the README's examples use."""
    return {
        "PROD-A": ProductFactory(product_id="PROD-A", stock=100),
        "PROD-B": ProductFactory(product_id="PROD-B", stock=50, price=Decimal("25.00")),
        "CUST-1": CustomerFactory(customer_id="CUST-1"),
    }


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):  # type: ignore[no-untyped-def]
    """With REQUIRE_SERVICES=1 a skipped service test is a failure, whatever skipped it."""
    outcome = yield
    report = outcome.get_result()
    expected_failure = hasattr(report, "wasxfail")  # an xfail is reported as a skip
    if (
        report.skipped
        and not expected_failure
        and required()
        and item.get_closest_marker("services")
    ):
        report.outcome = "failed"
        report.longrepr = f"REQUIRE_SERVICES=1 but the service test was skipped: {report.longrepr}"
