"""``manage.py dead_letters import``: RabbitMQ's dead-letter queue drained into DeadLetter rows."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from kombu import Connection

from idempotency import deadletters
from idempotency.models import DeadLetter
from orders.tasks import place_order
from project.queues import dead_letter_queue, work_queue
from tests.factories import place_order_event
from tests.services import AMQP_URL, REDIS_URL, require_broker, wait_for

pytestmark = [pytest.mark.services, pytest.mark.django_db]


@pytest.fixture
def queue_name() -> Iterator[str]:
    require_broker(AMQP_URL)
    name = f"test-import-{uuid.uuid4().hex}"
    with Connection(AMQP_URL) as conn:
        for queue in (work_queue(name), dead_letter_queue(name)):
            queue.bind(conn.default_channel).declare()
    yield name
    with Connection(AMQP_URL) as conn:
        for queue in (work_queue(name), dead_letter_queue(name)):
            queue.bind(conn.default_channel).delete()


def reject_into_dead_letter_queue(name: str, event: dict[str, object]) -> str:
    """Publish a PlaceOrder task message and have RabbitMQ dead-letter it; its task id."""
    with Connection(AMQP_URL) as conn:
        result = place_order.apply_async(args=[event], queue=work_queue(name), connection=conn)
        channel = conn.channel()
        message = None

        def taken() -> bool:
            nonlocal message
            message = work_queue(name).bind(channel).get(no_ack=False)
            return message is not None

        wait_for(taken, 10, "the task message")
        assert message is not None
        message.reject(requeue=False)  # what a worker does with a task that failed for good
        channel.close()
    return str(result.id)


def waiting(name: str) -> int:
    with Connection(AMQP_URL) as conn:
        _, count, _ = conn.default_channel.queue_declare(queue=name, passive=True)
        return int(count)


def run_import(*args: str, verbosity: int = 1) -> str:
    out = StringIO()
    call_command(
        "dead_letters", "import", "--broker", AMQP_URL, *args, stdout=out, verbosity=verbosity
    )
    return out.getvalue()


def test_broker_dead_letters_become_rows_once(queue_name: str) -> None:
    dead = f"{queue_name}.dead"
    event = place_order_event()
    task_id = reject_into_dead_letter_queue(queue_name, event)
    known_id = reject_into_dead_letter_queue(queue_name, place_order_event())
    # The worker stored this one itself before rejecting it: it must not be imported twice.
    deadletters.record(reason="failed", task_name=place_order.name, task_id=known_id)
    wait_for(lambda: waiting(dead) == 2, 10, "both messages in the dead-letter queue")

    out = run_import("--queue", dead, "--dry-run")
    assert f"{dead}: would import 1 dead letter(s), skipped 1 already stored" in out
    wait_for(lambda: waiting(dead) == 2, 10, "the dry run to give both messages back")
    assert DeadLetter.objects.count() == 1

    out = run_import("--queue", dead, "--limit", "1")
    assert f"{dead}: 2 message(s) waiting" in out
    assert f"{dead}: imported 1 dead letter(s), skipped 0 already stored" in out
    assert waiting(dead) == 1

    out = run_import("--queue", dead, verbosity=2)
    assert f"skipped {place_order.name}[{known_id}]" in out
    assert waiting(dead) == 0
    letter = DeadLetter.objects.get(reason=DeadLetter.Reason.BROKER)
    assert (letter.task_name, letter.task_id) == (place_order.name, task_id)
    assert letter.args == [event]
    assert letter.kwargs == {}
    assert letter.event_id == event["eventId"]
    assert letter.headers["x-death"][0]["reason"] == "rejected"
    assert letter.headers["x-death"][0]["queue"] == queue_name
    assert "rejected from queue" in letter.exception
    assert letter.can_redrive
    assert DeadLetter.objects.filter(task_id=known_id).count() == 1

    assert "imported 0 dead letter(s)" in run_import("--queue", dead)
    out = StringIO()
    call_command("dead_letters", "list", stdout=out)
    assert "2 dead letter(s) pending" in out.getvalue()


def test_an_undecodable_message_is_imported_with_its_raw_body(queue_name: str) -> None:
    dead = f"{queue_name}.dead"
    with Connection(AMQP_URL) as conn:
        conn.default_channel.basic_publish(
            conn.default_channel.prepare_message(
                b"\x80not json", content_type="application/json", headers={"id": "t-raw"}
            ),
            exchange="",
            routing_key=dead,
        )
    wait_for(lambda: waiting(dead) == 1, 10, "the message")
    run_import("--queue", dead)
    letter = DeadLetter.objects.get()
    assert (letter.reason, letter.task_id, letter.args) == ("broker", "t-raw", None)
    assert "not json" in letter.body
    assert not letter.can_redrive


def test_a_row_that_cannot_be_stored_leaves_the_message_queued(
    queue_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from django.db import OperationalError

    dead = f"{queue_name}.dead"
    reject_into_dead_letter_queue(queue_name, place_order_event())
    wait_for(lambda: waiting(dead) == 1, 10, "the message")

    def down(fields: object) -> None:
        raise OperationalError("the database is down")

    monkeypatch.setattr("idempotency.deadletters.store._store", down)
    with pytest.raises(CommandError, match="could not be stored"):
        run_import("--queue", dead)
    wait_for(lambda: waiting(dead) == 1, 10, "the message to stay queued")
    assert not DeadLetter.objects.exists()


def test_the_default_queues_come_from_the_celery_queues() -> None:
    assert deadletters.dead_letter_queue_names([work_queue("orders")]) == ["orders.dead"]
    from kombu import Queue

    assert deadletters.dead_letter_queue_names([Queue("plain")]) == []


def test_bad_brokers_and_queues_are_command_errors(queue_name: str) -> None:
    with pytest.raises(CommandError, match="no queue 'no-such-queue"):
        run_import("--queue", f"no-such-queue-{uuid.uuid4().hex}")
    with pytest.raises(CommandError, match="--limit must be at least 1"):
        run_import("--queue", f"{queue_name}.dead", "--limit", "0")
    require_broker(REDIS_URL)
    with pytest.raises(CommandError, match="reads RabbitMQ and SQS dead-letter queues"):
        call_command("dead_letters", "import", "--broker", REDIS_URL, stdout=StringIO())
