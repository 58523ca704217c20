"""The same PlaceOrder event published three times through a real broker to a real worker."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from kombu import Connection, Queue

from idempotency.models import ProcessedEvent
from orders.models import Order, Product
from orders.tasks import place_order
from tests.factories import CustomerFactory, ProductFactory, place_order_event
from tests.services import BROKERS, celery_worker, require_broker, require_postgres, wait_for

pytestmark = [pytest.mark.services, pytest.mark.django_db(transaction=True)]


@pytest.fixture(params=sorted(BROKERS))
def broker_url(request: pytest.FixtureRequest) -> str:
    require_postgres()
    url = BROKERS[request.param]
    require_broker(url)
    return url


@pytest.fixture
def queue_name(broker_url: str) -> object:
    """A queue of this test's own, so nothing left over from another run reaches its worker."""
    name = f"test-{uuid.uuid4().hex}"
    yield name
    with Connection(broker_url) as conn:
        Queue(name).bind(conn.default_channel).delete()


def test_three_deliveries_make_one_order(broker_url: str, queue_name: str, tmp_path: Path) -> None:
    ProductFactory(product_id="PROD-A", stock=10)
    CustomerFactory(customer_id="CUST-1")
    event = place_order_event(items=[{"productId": "PROD-A", "quantity": 2}])

    with celery_worker(broker_url, queues=queue_name, log=tmp_path / "worker.log") as worker:
        with Connection(broker_url) as conn:
            for _ in range(3):
                place_order.apply_async(args=[event], queue=queue_name, connection=conn)

        def all_handled() -> bool:
            return (tmp_path / "worker.log").read_text().count("succeeded in") >= 3

        wait_for(all_handled, 60, "the worker to handle the three deliveries")
        assert worker.poll() is None, "the worker died"

    log = (tmp_path / "worker.log").read_text()
    assert log.count("discarded") == 2, log
    assert Order.objects.filter(original_event_id=event["eventId"]).count() == 1
    assert Order.objects.get().status == Order.Status.ACCEPTED
    assert Product.objects.get(product_id="PROD-A").stock == 8
    assert ProcessedEvent.objects.for_event(event["eventId"]).count() == 1
