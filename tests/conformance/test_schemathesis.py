"""The OpenAPI schema against the live API: schemathesis, every check, on gunicorn.

``make conformance`` (a stage of .ci/run). Schemathesis reads ``/api/schema/`` from the server
as deployed (gunicorn on PostgreSQL, DEBUG off), generates requests that the schema allows and
requests that it forbids, and checks each answer: no 5xx, a documented status code, content
type and headers, a body that matches the declared schema, an allowed request accepted and a
forbidden one refused. Zero failures, or this test fails with schemathesis's report.

Bounded: ``CONFORMANCE_EXAMPLES`` examples per operation (15) with a fixed seed
(``CONFORMANCE_SEED``, 1), so a run is reproducible and short (18-32 s for ``make
conformance``, schemathesis itself 12-22 s of it, on 2 CPUs); another seed explores other
inputs. ``schemathesis.toml`` names the ids the fixture creates where an operation needs one, and
fails the run on a "missing test data" warning (an operation that only ever answered 404).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from django.utils import timezone
from rest_framework.authtoken.models import Token

from orders.models import Order
from tests.factories import (
    CustomerFactory,
    OrderFactory,
    OrderItemFactory,
    PaymentFactory,
    ProductFactory,
    UserFactory,
)
from tests.integration.test_web_server import Server, gunicorn
from tests.services import unavailable

pytestmark = [
    pytest.mark.conformance,
    pytest.mark.services,
    pytest.mark.django_db(transaction=True),
]

EXAMPLES = int(os.environ.get("CONFORMANCE_EXAMPLES", "15"))
SEED = int(os.environ.get("CONFORMANCE_SEED", "1"))


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    with gunicorn(tmp_path) as running:
        yield running


@pytest.fixture
def token(db: Any) -> str:
    """A superuser's token (it may write), and data for the read endpoints to return."""
    admin = UserFactory(username="conformance", is_staff=True, is_superuser=True)
    product = ProductFactory(product_id="PROD-A", price=Decimal("10.00"), stock=1000)
    customer = CustomerFactory(customer_id="CUST-1", balance=Decimal("100.00"))
    # An order still open (shippedAt null) and a shipped one, both listed by GET /api/orders/.
    open_order = OrderFactory(order_id="ORD-1", customer=customer, total=Decimal("20.00"))
    OrderItemFactory(order=open_order, product=product, quantity=2)
    shipped = OrderFactory(
        order_id="ORD-2",
        customer=customer,
        status=Order.Status.SHIPPED,
        tracking_number="TRK-1",
        shipped_at=timezone.now() - timedelta(minutes=1),
    )
    PaymentFactory(order=shipped, amount=Decimal("10.00"))
    return Token.objects.create(user=admin).key


def schemathesis() -> str:
    path = Path(sys.executable).with_name("schemathesis")
    if not path.exists():
        unavailable("schemathesis is not installed (requirements/dev.txt)")
    return str(path)


def test_the_api_conforms_to_its_schema(server: Server, token: str, tmp_path: Path) -> None:
    command = [
        schemathesis(),
        *("--config-file", str(Path(__file__).with_name("schemathesis.toml"))),
        "run",
        f"http://127.0.0.1:{server.port}/api/schema/",
        *("--checks", "all"),
        *("--header", f"Authorization: Token {token}"),
        *("--max-examples", str(EXAMPLES)),
        *("--seed", str(SEED)),
        *("--workers", "2"),
        *("--request-timeout", "30"),
        "--no-color",
    ]
    started = time.monotonic()
    run = subprocess.run(
        command,
        cwd=tmp_path,  # no project config file is picked up by accident
        env={**os.environ, "NO_COLOR": "1"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    output = run.stdout + run.stderr
    (tmp_path / "schemathesis.txt").write_text(output)
    summary = [line for line in output.splitlines() if re.search(r"generated|passed|failure", line)]
    print(f"schemathesis ({time.monotonic() - started:.0f} s, seed {SEED}):")
    print("\n".join(summary[-3:]))
    assert run.returncode == 0, output[-12000:]
    assert re.search(r"\d+ generated, \d+ passed", output), output[-3000:]
    assert "failure" not in output.splitlines()[-1], output[-12000:]
