"""What becomes of a delivery, with a real ``celery worker`` on PostgreSQL and RabbitMQ/Redis:
a database outage longer than the retry window, a hook raising after the commit, a message
that outlives its hard time limit on every delivery, failures outside the delivery (a message
with no event, a callback that cannot be sent) while no dead letter can be stored."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.db import connection
from kombu import Connection

from idempotency.models import DeadLetter, DeliveryAttempt, ProcessedEvent
from project.queues import dead_letter_queue, work_queue
from tests.integration import worker_tasks
from tests.integration.dbproxy import database_proxy
from tests.services import (
    BROKERS,
    celery_worker,
    database_url,
    require_broker,
    require_postgres,
    wait_for,
)

pytestmark = [pytest.mark.services, pytest.mark.django_db(transaction=True)]

INCLUDE = ["tests.integration.worker_tasks"]


@pytest.fixture(params=sorted(BROKERS))
def broker_url(request: pytest.FixtureRequest) -> str:
    require_postgres()
    url = BROKERS[request.param]
    require_broker(url)
    return url


@pytest.fixture
def queue_name(broker_url: str) -> Iterator[str]:
    name = f"test-delivery-{uuid.uuid4().hex}"
    yield name
    with Connection(broker_url) as conn:
        for queue in (work_queue(name), dead_letter_queue(name)):
            queue.bind(conn.default_channel).delete()


def publish(broker_url: str, queue: str, task: Any, event: dict[str, Any]) -> str:
    with Connection(broker_url) as conn:
        result = task.apply_async(args=[event], queue=work_queue(queue), connection=conn)
    return str(result.id)


def send_without_event(broker_url: str, queue: str, task: Any) -> str:
    """A message of *task* with no argument: Celery's own check would refuse to send it."""
    with Connection(broker_url) as conn:
        result = task.app.send_task(task.name, args=[], queue=work_queue(queue), connection=conn)
    return str(result.id)


def dead_count(broker_url: str, queue: str) -> int:
    if not broker_url.startswith("amqp"):
        return 0
    with Connection(broker_url) as conn:
        channel = conn.default_channel
        dead_letter_queue(queue).bind(channel).declare()
        _, count, _ = channel.queue_declare(queue=f"{queue}.dead", passive=True)
    return int(count)


def settings_env(**values: Any) -> dict[str, str]:
    return {"TEST_IDEMPOTENCY": json.dumps(values)}


def processed(event_id: str) -> bool:
    return ProcessedEvent.objects.for_event(event_id).exists()


def test_a_database_outage_longer_than_the_retry_window_loses_nothing(
    broker_url: str, queue_name: str, tmp_path: Path
) -> None:
    log = tmp_path / "worker.log"
    settings = connection.settings_dict
    event = {"eventId": f"outage-{uuid.uuid4().hex}"}
    with database_proxy(
        settings.get("HOST") or "127.0.0.1", int(settings.get("PORT") or 5432)
    ) as db:
        proxied = database_url().replace(f":{settings.get('PORT') or 5432}/", f":{db.port}/")
        env = {"DATABASE_URL": proxied, **settings_env(TRANSIENT_RETRY_WINDOW=2)}
        with celery_worker(
            broker_url, queues=queue_name, log=log, concurrency=1, include=INCLUDE, extra_env=env
        ) as worker:
            db.cut()
            publish(broker_url, queue_name, worker_tasks.apply_event, event)
            # Several windows go by: each ends with the message given back to the broker.
            wait_for(
                lambda: log.read_text().count("goes back to the broker") >= 3,
                60,
                "the message to go back to the broker three times",
            )
            assert not processed(event["eventId"])
            db.restore()
            wait_for(lambda: processed(event["eventId"]), 60, "the event to be applied")
            assert worker.poll() is None, "the worker died"
    text = log.read_text()
    assert "could not store a dead letter" not in text
    assert ProcessedEvent.objects.for_event(event["eventId"]).count() == 1
    assert not DeadLetter.objects.exists()
    assert dead_count(broker_url, queue_name) == 0


def test_a_hook_raising_after_the_commit_is_a_success(
    broker_url: str, queue_name: str, tmp_path: Path
) -> None:
    log = tmp_path / "worker.log"
    event = {"eventId": f"hook-{uuid.uuid4().hex}"}
    with celery_worker(broker_url, queues=queue_name, log=log, concurrency=1, include=INCLUDE):
        task_id = publish(broker_url, queue_name, worker_tasks.hook_raises_after_commit, event)
        wait_for(lambda: f"{task_id}] succeeded" in log.read_text(), 60, "the task to succeed")
        # Redelivered copies would be discarded, but there must be none: the message was acked.
        publish(broker_url, queue_name, worker_tasks.apply_event, {"eventId": "after"})
        wait_for(lambda: processed("after"), 60, "the next event")
    text = log.read_text()
    assert "then an on_commit callback raised" in text
    assert "a notification after the commit failed" in text
    assert ProcessedEvent.objects.for_event(event["eventId"]).count() == 1
    assert not DeadLetter.objects.exists()
    assert dead_count(broker_url, queue_name) == 0


def test_a_message_killed_on_every_delivery_ends_as_one_dead_letter(
    broker_url: str, queue_name: str, tmp_path: Path
) -> None:
    log = tmp_path / "worker.log"
    poison = {"eventId": f"poison-{uuid.uuid4().hex}"}
    behind = {"eventId": f"behind-{uuid.uuid4().hex}"}
    env = settings_env(DELIVERY_LIMIT=3)
    with celery_worker(
        broker_url, queues=queue_name, log=log, concurrency=1, include=INCLUDE, extra_env=env
    ) as worker:
        task_id = publish(broker_url, queue_name, worker_tasks.outlive_the_time_limit, poison)
        publish(broker_url, queue_name, worker_tasks.apply_event, behind)
        wait_for(lambda: processed(behind["eventId"]), 120, "the event behind the poison")
        wait_for(lambda: DeadLetter.objects.exists(), 30, "the dead letter")
        assert worker.poll() is None, "the worker died"
    text = log.read_text()
    assert text.count("Hard time limit (2") == 3, text[-3000:]  # deliveries 1 to 3 ran
    letter = DeadLetter.objects.get()
    assert (letter.reason, letter.task_id) == (DeadLetter.Reason.DELIVERY_LIMIT, task_id)
    assert letter.event_id == poison["eventId"]
    assert letter.attempts == 4
    assert letter.args == [poison]
    assert DeliveryAttempt.objects.get(task_id=task_id).deliveries == 4
    assert not processed(poison["eventId"])
    if broker_url.startswith("amqp"):
        assert dead_count(broker_url, queue_name) == 1  # rejected without requeue


def test_an_outage_of_many_windows_does_not_spend_the_delivery_limit(
    broker_url: str, queue_name: str, tmp_path: Path
) -> None:
    # The database answers (the delivery counter is written) but the inbox is locked: each
    # delivery times out on the lock for a whole window and is given back. Those give-backs are
    # no deaths: past DELIVERY_LIMIT of them the event is still applied, not dead-lettered.
    import psycopg

    log = tmp_path / "worker.log"
    event = {"eventId": f"locked-{uuid.uuid4().hex}"}
    env = {
        "PGOPTIONS": "-c lock_timeout=200",
        **settings_env(TRANSIENT_RETRY_WINDOW=1, DELIVERY_LIMIT=2),
    }
    with (
        psycopg.connect(database_url()) as locker,
        celery_worker(
            broker_url, queues=queue_name, log=log, concurrency=1, include=INCLUDE, extra_env=env
        ) as worker,
    ):
        locker.execute("LOCK TABLE idempotency_processedevent IN ACCESS EXCLUSIVE MODE")
        task_id = publish(broker_url, queue_name, worker_tasks.apply_event, event)
        wait_for(
            lambda: log.read_text().count("goes back to the broker") >= 5,
            90,
            "the message to go back to the broker five times",
        )
        locker.rollback()
        wait_for(lambda: processed(event["eventId"]), 60, "the event to be applied")
        assert worker.poll() is None, "the worker died"
    assert ProcessedEvent.objects.for_event(event["eventId"]).count() == 1
    assert not DeadLetter.objects.exists()
    assert DeliveryAttempt.objects.get(task_id=task_id).deliveries <= 2
    assert dead_count(broker_url, queue_name) == 0


def test_a_message_without_an_event_is_kept_through_a_database_outage(
    broker_url: str, queue_name: str, tmp_path: Path
) -> None:
    # It fails before the wrapper's logic could run: with the database down it is given back,
    # not rejected with nothing stored; once the database is back it is an invalid event.
    log = tmp_path / "worker.log"
    settings = connection.settings_dict
    with database_proxy(
        settings.get("HOST") or "127.0.0.1", int(settings.get("PORT") or 5432)
    ) as db:
        proxied = database_url().replace(f":{settings.get('PORT') or 5432}/", f":{db.port}/")
        with celery_worker(
            broker_url,
            queues=queue_name,
            log=log,
            concurrency=1,
            include=INCLUDE,
            extra_env={"DATABASE_URL": proxied},
        ) as worker:
            db.cut()
            task_id = send_without_event(broker_url, queue_name, worker_tasks.apply_event)
            wait_for(
                lambda: log.read_text().count(f"{task_id}] reject requeue=True") >= 3,
                60,
                "the message to go back to the broker three times",
            )
            assert not DeadLetter.objects.exists()
            db.restore()
            wait_for(lambda: DeadLetter.objects.exists(), 60, "the dead letter")
            assert worker.poll() is None, "the worker died"
    assert "could not store a dead letter" in log.read_text()
    letter = DeadLetter.objects.get()
    assert (letter.reason, letter.task_id) == (DeadLetter.Reason.INVALID_EVENT, task_id)
    assert (letter.task_name, letter.args) == (worker_tasks.apply_event.name, [])
    if broker_url.startswith("amqp"):
        assert dead_count(broker_url, queue_name) == 1  # rejected without requeue, once stored


def test_a_failure_after_the_task_returned_goes_back_while_no_dead_letter_can_be_stored(
    broker_url: str, queue_name: str, tmp_path: Path
) -> None:
    # The callback is routed to a queue the worker does not know: Celery raises QueueNotFound
    # after the task returned, outside the delivery, and the failure reaches on_failure.
    log = tmp_path / "worker.log"
    unstorable = tmp_path / "dead-letters-unstorable"
    unstorable.touch()
    event = {"eventId": f"linked-{uuid.uuid4().hex}"}
    env = {"TEST_DEAD_LETTERS_UNSTORABLE": str(unstorable)}
    with celery_worker(
        broker_url, queues=queue_name, log=log, concurrency=1, include=INCLUDE, extra_env=env
    ) as worker:
        callback = worker_tasks.apply_event.signature(queue=f"{queue_name}-missing")
        with Connection(broker_url) as conn:
            task_id = worker_tasks.apply_event.apply_async(
                args=[event], queue=work_queue(queue_name), link=callback, connection=conn
            ).id
        # Given back, then redelivered: a duplicate whose callback fails again.
        wait_for(
            lambda: log.read_text().count(f"{task_id}] failed outside its delivery") >= 3,
            60,
            "the message to go back to the broker three times",
        )
        assert log.read_text().count(f"{task_id}] received") >= 3  # redelivered: never dropped
        assert not DeadLetter.objects.exists()
        unstorable.unlink()  # the dead letter can be stored again: the message may leave
        wait_for(lambda: DeadLetter.objects.exists(), 60, "the dead letter")
        assert worker.poll() is None, "the worker died"
    assert "QueueNotFound" in log.read_text()
    assert ProcessedEvent.objects.for_event(event["eventId"]).count() == 1  # applied once
    letter = DeadLetter.objects.get()
    assert (letter.task_id, letter.event_id) == (task_id, event["eventId"])
    assert "QueueNotFound" in letter.exception
