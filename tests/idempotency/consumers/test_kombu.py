"""KombuConsumer against a real RabbitMQ and a real Redis: acked after the commit, never before."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any
from unittest import mock

import pytest
from django.db import OperationalError
from kombu import Connection, Exchange, Queue

from idempotency import deadletters
from idempotency.consumers import EventConsumer, KombuConsumer, Outcome
from idempotency.models import DeadLetter, ProcessedEvent
from tests.idempotency.consumers import handlers
from tests.services import BROKERS, require_broker, require_postgres

pytestmark = [pytest.mark.services, pytest.mark.django_db(transaction=True)]

CONSUMER = "tests.consumers.kombu"


@pytest.fixture(params=sorted(BROKERS))
def broker_url(request: pytest.FixtureRequest) -> str:
    require_postgres()
    url = BROKERS[request.param]
    require_broker(url)
    return url


@pytest.fixture
def queue(broker_url: str) -> Iterator[Queue]:
    name = f"idem_consumers_{uuid.uuid4().hex}"
    made = Queue(name, Exchange(name, type="direct"), routing_key=name, durable=True)
    with Connection(broker_url) as conn:
        made.bind(conn.default_channel).declare()
    yield made
    with Connection(broker_url) as conn:
        made.bind(conn.default_channel).delete()


def publish(url: str, queue: Queue, *bodies: Any, **options: Any) -> None:
    with Connection(url) as conn, conn.Producer() as producer:
        for body in bodies:
            producer.publish(
                body,
                exchange=queue.exchange,
                routing_key=queue.routing_key,
                declare=[queue],
                retry=True,
                **options,
            )


def remaining(url: str, queue: Queue) -> int:
    """The messages left in *queue*, taken off it (works alike on RabbitMQ and Redis)."""
    with Connection(url) as conn:
        bound = queue.bind(conn.default_channel)
        count = 0
        while (message := bound.get(no_ack=False)) is not None:
            count += 1
            message.ack()
        return count


def run(url: str, queue: Queue, handler: Any = handlers.credit, **options: Any) -> list[Outcome]:
    outcomes: list[Outcome] = []
    events = EventConsumer(handler, consumer=CONSUMER, **options)
    consumer = KombuConsumer(url, [queue], events, on_outcome=outcomes.append, poll_interval=0.2)
    consumer.run(idle_timeout=1.5)
    return outcomes


def test_each_event_is_applied_once_and_every_message_acknowledged(
    broker_url: str, queue: Queue
) -> None:
    handlers.ensure_customer()
    first, second = (handlers_event() for _ in range(2))
    publish(broker_url, queue, first, second, first, first)
    outcomes = run(broker_url, queue)
    assert sorted(o.status for o in outcomes) == [
        "duplicate",
        "duplicate",
        "processed",
        "processed",
    ]
    assert handlers.effects(first["eventId"]) == 1
    assert handlers.effects(second["eventId"]) == 1
    assert remaining(broker_url, queue) == 0


def test_a_poison_message_is_dead_lettered_and_leaves_the_queue(
    broker_url: str, queue: Queue
) -> None:
    handlers.ensure_customer()
    body = handlers_event()
    publish(broker_url, queue, body, message_id="poison-1")
    outcomes = run(broker_url, queue, handlers.poison)
    assert [o.status for o in outcomes] == ["dead-lettered"]
    letter = DeadLetter.objects.get()
    assert (letter.reason, letter.task_id) == (deadletters.FAILED, "poison-1")
    assert json.loads(letter.body) == body
    assert handlers.effects(body["eventId"]) == 0
    assert remaining(broker_url, queue) == 0


def test_a_message_not_in_json_is_dead_lettered_not_unpickled(
    broker_url: str, queue: Queue
) -> None:
    publish(broker_url, queue, {"eventId": "pickled"}, serializer="pickle")
    outcomes = run(broker_url, queue)
    assert [o.status for o in outcomes] == ["dead-lettered"]
    assert DeadLetter.objects.get().reason == deadletters.UNDECODABLE
    assert not ProcessedEvent.objects.exists()
    assert remaining(broker_url, queue) == 0


def test_a_message_with_no_durable_outcome_stays_on_the_broker(
    broker_url: str, queue: Queue
) -> None:
    handlers.ensure_customer()
    body = handlers_event()
    publish(broker_url, queue, body)
    events = EventConsumer(handlers.poison, consumer=CONSUMER)
    consumer = KombuConsumer(broker_url, [queue], events, poll_interval=0.2)
    with mock.patch("idempotency.deadletters.store._store", side_effect=OperationalError("down")):
        assert consumer.run(limit=1) == 1
    assert not DeadLetter.objects.exists()
    assert remaining(broker_url, queue) == 1
    # ... and its redelivery, once the dead letter can be stored, is kept and acknowledged.
    publish(broker_url, queue, body)
    assert [o.status for o in run(broker_url, queue, handlers.poison)] == ["dead-lettered"]
    assert remaining(broker_url, queue) == 0


def test_a_stop_leaves_the_rest_of_the_queue_with_the_broker(broker_url: str, queue: Queue) -> None:
    handlers.ensure_customer()
    bodies = [handlers_event() for _ in range(5)]
    publish(broker_url, queue, *bodies)
    events = EventConsumer(handlers.credit, consumer=CONSUMER)
    consumer = KombuConsumer(broker_url, [queue], events, poll_interval=0.2)
    consumer.on_outcome = lambda outcome: consumer.stop()
    assert consumer.run() == 1
    assert sum(handlers.effects(body["eventId"]) for body in bodies) == 1
    assert remaining(broker_url, queue) == 4


def test_queues_are_required() -> None:
    with pytest.raises(ValueError, match="queue"):
        KombuConsumer("memory://", [], EventConsumer(handlers.credit, consumer=CONSUMER))


def test_transport_options_go_to_the_connection_made_from_a_url() -> None:
    events = EventConsumer(handlers.credit, consumer=CONSUMER)
    made = KombuConsumer("memory://", ["q"], events, transport_options={"visibility_timeout": 5})
    assert made.connection.transport_options == {"visibility_timeout": 5}
    with Connection("memory://") as own, pytest.raises(TypeError, match=r"kombu\.Connection"):
        KombuConsumer(own, ["q"], events, transport_options={"visibility_timeout": 5})
    # A transport named by its path, for a URL whose scheme would pick another.
    named = KombuConsumer("memory://", ["q"], events, transport="kombu.transport.memory:Transport")
    assert named.connection.transport_cls == "kombu.transport.memory:Transport"


def handlers_event() -> dict[str, Any]:
    return {"eventId": str(uuid.uuid4())}


@pytest.mark.django_db(transaction=True)
def test_on_sqs_with_the_example_transport_each_event_is_applied_once(
    sqs_emulator: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQS through the library's transport (idempotency.celery.sqs), which flags a redelivery
    and deletes an acknowledged message; the emulator stands in for SQS (tests/sqs.py)."""
    from project import sqs
    from project.queues import work_queue
    from tests.integration.test_sqs import _attributes, _connection
    from tests.sqs import SQS_ENV

    require_postgres()
    for key, value in SQS_ENV.items():
        monkeypatch.setenv(key, value)
    name = f"idem-consumers-{uuid.uuid4().hex[:12]}"
    sqs.declare_queues(sqs_emulator.client, name, visibility_timeout=2, max_receive_count=5)
    try:
        handlers.ensure_customer()
        body = handlers_event()
        queue = work_queue(name)
        with _connection(sqs_emulator) as conn:
            conn.Producer().publish(
                body, exchange=queue.exchange, routing_key=name, declare=[queue]
            )
            conn.Producer().publish(
                body, exchange=queue.exchange, routing_key=name, declare=[queue]
            )
        outcomes: list[Outcome] = []
        events = EventConsumer(handlers.credit, consumer=CONSUMER)
        consumer = KombuConsumer(
            _connection(sqs_emulator), [queue], events, on_outcome=outcomes.append
        )
        consumer.run(idle_timeout=3)
        assert sorted(o.status for o in outcomes) == ["duplicate", "processed"]
        assert handlers.effects(body["eventId"]) == 1
        attributes = _attributes(sqs_emulator, sqs.queue_names(name)[0])
        assert attributes["ApproximateNumberOfMessages"] == "0"
        assert attributes["ApproximateNumberOfMessagesNotVisible"] == "0"
    finally:
        for sqs_name in sqs.queue_names(name):
            url = sqs_emulator.client.get_queue_url(QueueName=sqs_name)["QueueUrl"]
            sqs_emulator.client.delete_queue(QueueUrl=url)
