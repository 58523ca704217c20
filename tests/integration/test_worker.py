"""The same PlaceOrder event published three times through a real broker to a real worker."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from django.db import connection
from kombu import Connection

from idempotency.models import ProcessedEvent
from orders.models import Order, Product
from orders.tasks import place_order
from project.queues import dead_letter_queue, work_queue
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
        for queue in (work_queue(name), dead_letter_queue(name)):
            queue.bind(conn.default_channel).delete()


def test_three_deliveries_make_one_order(broker_url: str, queue_name: str, tmp_path: Path) -> None:
    ProductFactory(product_id="PROD-A", stock=10)
    CustomerFactory(customer_id="CUST-1")
    event = place_order_event(items=[{"productId": "PROD-A", "quantity": 2}])

    with celery_worker(broker_url, queues=queue_name, log=tmp_path / "worker.log") as worker:
        with Connection(broker_url) as conn:
            for _ in range(3):
                place_order.apply_async(args=[event], queue=work_queue(queue_name), connection=conn)

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


def worker_backends() -> set[tuple[int, object]]:
    """The other connections to the test database: (pid, backend start) of each."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pid, backend_start FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid() "
            "AND backend_type = 'client backend'"
        )
        return set(cursor.fetchall())


def test_the_worker_reuses_database_connections(
    broker_url: str, queue_name: str, tmp_path: Path
) -> None:
    tasks = 40
    ProductFactory(product_id="PROD-A", stock=1000)
    CustomerFactory(customer_id="CUST-1")
    log = tmp_path / "worker.log"
    with celery_worker(broker_url, queues=queue_name, log=log, concurrency=1):
        with Connection(broker_url) as conn:
            place_order.apply_async(
                args=[place_order_event()], queue=work_queue(queue_name), connection=conn
            )
        wait_for(lambda: log.read_text().count("succeeded in") >= 1, 60, "the first task")
        # Without reuse (CONN_MAX_AGE=0, or a Celery whose Django fix-up closes connections
        # after every task, unless CELERY_DB_REUSE_MAX) none would remain.
        before = worker_backends()
        assert before, "the worker closed its database connection after the task"
        with Connection(broker_url) as conn:
            for _ in range(tasks):
                place_order.apply_async(
                    args=[place_order_event()], queue=work_queue(queue_name), connection=conn
                )
        wait_for(lambda: log.read_text().count("succeeded in") >= tasks + 1, 120, "the tasks")
        after = worker_backends()
    assert Order.objects.filter(status=Order.Status.ACCEPTED).count() == tasks + 1
    # The same connection served all 40 tasks: no new session was opened.
    assert after == before
