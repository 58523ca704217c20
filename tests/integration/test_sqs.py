"""Amazon SQS (idempotency.celery.sqs, the example's options in project/sqs.py), against a
local SQS emulator (tests/sqs.py).

kombu's own SQS transport leaves a message rejected without requeue in SQS (it comes back after
the visibility timeout) and never flags a redelivery; the library's transport deletes the one and
flags the other. The worker's declaration gives the work queue its visibility timeout and a
redrive policy to ``<queue>-dead``, which ``dead_letters import`` drains.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from io import StringIO
from typing import Any

import pytest
from django.core.management import call_command
from django.test import override_settings
from kombu import Connection

from idempotency.models import DeadLetter
from orders.tasks import place_order
from project import sqs
from project.queues import work_queue
from tests.factories import place_order_event
from tests.services import ROOT
from tests.sqs import SQS_ENV, SQSEmulator

pytestmark = [pytest.mark.services]


@pytest.fixture
def sqs_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in SQS_ENV.items():
        monkeypatch.setenv(key, value)


@pytest.fixture
def queue(sqs_emulator: SQSEmulator, sqs_env: None) -> Iterator[str]:
    """A work queue of the test's own (visibility timeout 2 s, 2 receives), and its DLQ."""
    name = f"test-sqs-{uuid.uuid4().hex[:12]}"
    sqs.declare_queues(sqs_emulator.client, name, visibility_timeout=2, max_receive_count=2)
    yield name
    for sqs_name in sqs.queue_names(name):
        url = sqs_emulator.client.get_queue_url(QueueName=sqs_name)["QueueUrl"]
        sqs_emulator.client.delete_queue(QueueUrl=url)


def _connection(emulator: SQSEmulator, transport: Any = sqs.Transport) -> Connection:
    options = sqs.transport_options(
        {**SQS_ENV, "CELERY_SQS_WAIT_TIME_SECONDS": "0"}, visibility_timeout=2
    )
    return Connection(emulator.url, transport=transport, transport_options=options)


def _publish(conn: Connection, name: str, body: Any) -> None:
    q = work_queue(name)
    conn.Producer().publish(body, exchange=q.exchange, routing_key=name, declare=[q])


def _get(conn: Connection, name: str, wait: float = 0) -> Any:
    """The next message of *name*, polling up to *wait* seconds."""
    bound = work_queue(name).bind(conn.default_channel)
    deadline = time.monotonic() + wait
    while True:
        message = bound.get(no_ack=False)
        if message is not None or time.monotonic() >= deadline:
            return message
        time.sleep(0.2)


def _attributes(emulator: SQSEmulator, sqs_name: str) -> dict[str, str]:
    url = emulator.client.get_queue_url(QueueName=sqs_name)["QueueUrl"]
    found = emulator.client.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])
    return dict(found["Attributes"])


def test_a_reject_without_requeue_deletes_the_message(
    sqs_emulator: SQSEmulator, queue: str
) -> None:
    with _connection(sqs_emulator) as conn:
        _publish(conn, queue, {"n": 1})
        message = _get(conn, queue, wait=5)
        assert message is not None
        assert message.payload == {"n": 1}
        message.reject(requeue=False)
        # Past the visibility timeout: kombu's own transport would hand it out again here.
        time.sleep(3)
        assert _get(conn, queue) is None
    attrs = _attributes(sqs_emulator, sqs.queue_names(queue)[0])
    assert attrs["ApproximateNumberOfMessages"] == attrs["ApproximateNumberOfMessagesNotVisible"]
    assert attrs["ApproximateNumberOfMessages"] == "0"


def test_kombus_own_transport_hands_a_rejected_message_out_again(
    sqs_emulator: SQSEmulator, queue: str
) -> None:
    """The gap idempotency.celery.sqs closes, shown on kombu's transport (if kombu fixes it, this
    fails and the override can go)."""
    from kombu.transport.SQS import Transport as KombuTransport

    with _connection(sqs_emulator, KombuTransport) as conn:
        _publish(conn, queue, {"n": 2})
        message = _get(conn, queue, wait=5)
        assert message is not None
        message.reject(requeue=False)
        again = _get(conn, queue, wait=10)
        assert again is not None
        assert again.payload == {"n": 2}
        again.ack()


def test_a_redelivery_is_flagged_and_a_requeue_is_at_once(
    sqs_emulator: SQSEmulator, queue: str
) -> None:
    """The worker receives with ``ApproximateReceiveCount`` (kombu's asynchronous path asks for
    it); a count above 1 sets ``delivery_info["redelivered"]``, which DELIVERY_LIMIT counts."""
    url = sqs_emulator.client.get_queue_url(QueueName=queue)["QueueUrl"]

    def receive() -> dict[str, Any]:
        found = sqs_emulator.client.receive_message(
            QueueUrl=url, AttributeNames=["ApproximateReceiveCount"], WaitTimeSeconds=1
        )
        (message,) = found["Messages"]
        return dict(message)

    with _connection(sqs_emulator) as conn:
        channel = conn.default_channel
        _publish(conn, queue, {"n": 3})
        first = _get(conn, queue, wait=5)
        assert first is not None
        assert not first.delivery_info.get("redelivered")
        # A killed pool process's message is requeued: visible again at once, not after 2 s.
        first.reject(requeue=True)
        raw = receive()
        assert raw["Attributes"]["ApproximateReceiveCount"] == "2"
        second = channel._message_to_python(raw, queue, url)
        assert second["properties"]["delivery_info"]["redelivered"] is True
        sqs_emulator.client.delete_message(QueueUrl=url, ReceiptHandle=raw["ReceiptHandle"])


def test_a_plain_kombu_receive_flags_a_redelivery_too(
    sqs_emulator: SQSEmulator, queue: str
) -> None:
    """kombu's synchronous receive (a plain kombu consumer, ``Queue.get``) asks SQS for no
    attribute; the library's asks for the receive count, so the redelivery is flagged there too
    (kombu's own transport leaves it unflagged)."""
    from kombu.transport.SQS import Transport as KombuTransport

    plain = {"region": "us-east-1", "is_secure": False, "wait_time_seconds": 0}
    for transport, options, flagged in (
        (sqs.Transport, None, True),
        # Options written by hand, with no fetch_message_attributes: asked for all the same.
        (sqs.Transport, plain, True),
        (KombuTransport, None, False),
    ):
        if options is None:
            conn = _connection(sqs_emulator, transport)
        else:
            conn = Connection(sqs_emulator.url, transport=transport, transport_options=options)
        with conn:
            _publish(conn, queue, {"n": 5})
            first = _get(conn, queue, wait=5)
            assert first is not None
            assert not first.delivery_info.get("redelivered")
            first.reject(requeue=True)
            again = _get(conn, queue, wait=5)
            assert again is not None
            assert again.payload == {"n": 5}
            assert bool(again.delivery_info.get("redelivered")) is flagged, (transport, options)
            again.ack()


def test_the_redrive_policy_moves_a_message_to_the_dead_letter_queue(
    sqs_emulator: SQSEmulator, queue: str, db: None
) -> None:
    """maxReceiveCount 2: two receives without an outcome, then ``<queue>-dead``; the import
    makes it a dead letter (reason broker) and empties the queue."""
    event = place_order_event()
    with _connection(sqs_emulator) as conn:
        result = place_order.apply_async(args=[event], queue=work_queue(queue), connection=conn)
        for _ in range(2):
            message = _get(conn, queue, wait=5)
            assert message is not None
            message.reject(requeue=True)
        # The third receive finds it gone: SQS moved it to the dead-letter queue.
        assert _get(conn, queue, wait=3) is None
    dead = sqs.queue_names(queue)[1]
    assert _attributes(sqs_emulator, dead)["ApproximateNumberOfMessages"] == "1"
    out = StringIO()
    call_command(
        "dead_letters",
        "import",
        "--broker",
        sqs_emulator.url,
        "--queue",
        f"{queue}.dead",
        stdout=out,
    )
    assert f"{queue}.dead: imported 1 dead letter(s)" in out.getvalue(), out.getvalue()
    letter = DeadLetter.objects.get(task_id=result.id)
    assert (letter.reason, letter.task_name) == (DeadLetter.Reason.BROKER, place_order.name)
    assert letter.args == [event]
    assert _attributes(sqs_emulator, dead)["ApproximateNumberOfMessages"] == "0"


def test_declare_queues_sets_the_timeout_and_the_redrive_policy(
    sqs_emulator: SQSEmulator, sqs_env: None
) -> None:
    name = f"test-sqs-{uuid.uuid4().hex[:12]}"
    # A queue kombu created first, with its own visibility timeout: brought up to date.
    with _connection(sqs_emulator) as conn:
        _publish(conn, name, {"n": 4})
    urls = sqs.declare_queues(sqs_emulator.client, name, visibility_timeout=930)
    work, dead = sqs.queue_names(name)
    assert (work, dead) == (name, f"{name}-dead")
    attrs = _attributes(sqs_emulator, work)
    assert attrs["VisibilityTimeout"] == "930"
    policy = json.loads(attrs["RedrivePolicy"])
    assert policy["deadLetterTargetArn"] == _attributes(sqs_emulator, dead)["QueueArn"]
    assert int(policy["maxReceiveCount"]) == sqs.DEFAULT_MAX_RECEIVE_COUNT
    assert attrs["ApproximateNumberOfMessages"] == "1", "declaring again keeps the messages"
    for url in urls.values():
        sqs_emulator.client.delete_queue(QueueUrl=url)
    with pytest.raises(ValueError, match="max_receive_count must be at least 1"):
        sqs.declare_queues(sqs_emulator.client, name, visibility_timeout=30, max_receive_count=0)


def test_transport_options_from_the_environment() -> None:
    options = sqs.transport_options({}, visibility_timeout=900)
    assert options["visibility_timeout"] == 900
    assert options["wait_time_seconds"] == 20, "long polling, at SQS's maximum"
    assert options["region"] == "us-east-1"
    assert options["is_secure"] is True
    assert options["fetch_message_attributes"] == ["ApproximateReceiveCount"]
    options = sqs.transport_options(
        {
            "CELERY_VISIBILITY_TIMEOUT": "1200",
            "CELERY_SQS_WAIT_TIME_SECONDS": "5",
            "AWS_DEFAULT_REGION": "eu-west-1",
            "CELERY_SQS_QUEUE_PREFIX": "prod-",
            "CELERY_SQS_SECURE": "0",
        },
        visibility_timeout=900,
    )
    assert (options["visibility_timeout"], options["wait_time_seconds"]) == (1200, 5)
    assert (options["region"], options["queue_name_prefix"]) == ("eu-west-1", "prod-")
    assert options["is_secure"] is False
    assert sqs.queue_names("orders", "prod-") == ("prod-orders", "prod-orders-dead")


def test_the_shipped_options_fetch_the_receive_count() -> None:
    """What a project on the sqs extra copies: the receive count is fetched (or the redelivery
    flag could never be set), whatever else it asks for."""
    from idempotency.celery import sqs as shipped

    options = shipped.transport_options(visibility_timeout=900, region="eu-west-1")
    assert options["fetch_message_attributes"] == ["ApproximateReceiveCount"]
    assert (options["visibility_timeout"], options["wait_time_seconds"]) == (900, 20)
    assert options["region"] == "eu-west-1"
    more = shipped.transport_options(
        visibility_timeout=60, fetch_message_attributes=["SentTimestamp"], queue_name_prefix="p-"
    )
    assert more["fetch_message_attributes"] == ["SentTimestamp", "ApproximateReceiveCount"]
    assert more["queue_name_prefix"] == "p-"
    everything = shipped.transport_options(visibility_timeout=60, fetch_message_attributes=["All"])
    assert everything["fetch_message_attributes"] == ["All"]


def test_the_example_path_is_the_shipped_transport() -> None:
    """``project.sqs:Transport`` (the example's older path) is the library's, re-exported."""
    from idempotency.celery import sqs as shipped

    for name in ("Transport", "Channel", "declare_queues", "declare_from_connection"):
        assert getattr(sqs, name) is getattr(shipped, name), name
    assert sqs.Transport.Channel is shipped.Channel


def test_w001_reads_the_sqs_visibility_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """idempotency.W001 compares the retention with the redelivery horizon: on SQS, the
    visibility timeout the example sets (the task time limit + the longest countdown + 5 min)."""
    from celery import Celery

    from idempotency import checks

    app = Celery("sqs-checks", set_as_current=False)
    app.conf.broker_url = "sqs://"
    app.conf.broker_transport_options = sqs.transport_options({}, visibility_timeout=900)
    monkeypatch.setattr(checks, "_celery_app", lambda: app)
    horizon = checks.broker_horizon(app)
    assert horizon is not None
    assert horizon.delay == timedelta(seconds=900)
    assert horizon in checks.redelivery_horizons(app), "W001 weighs it with the tasks' retries"
    with override_settings(IDEMPOTENCY={"RETENTION": timedelta(minutes=10)}):
        messages = checks.check_retention_outlasts_redelivery()
    assert [m.id for m in messages] == ["idempotency.W001"]


def _settings(env: dict[str, str], *names: str) -> subprocess.CompletedProcess[str]:
    """Import project.settings in a process of its own with *env*; print *names* as JSON."""
    code = (
        "import json, project.settings as s; "
        "s.QUEUE_ARGUMENTS = s.CELERY_TASK_QUEUES[0].queue_arguments; "
        f"print(json.dumps({{n: getattr(s, n, None) for n in {list(names)!r}}}, default=str))"
    )
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_example_settings_on_sqs() -> None:
    result = _settings(
        {"CELERY_BROKER_URL": "sqs://", "CELERY_SQS_MAX_RECEIVE_COUNT": "7"},
        "CELERY_BROKER_TRANSPORT",
        "CELERY_BROKER_TRANSPORT_OPTIONS",
        "SQS_MAX_RECEIVE_COUNT",
        "CELERY_WORKER_ENABLE_REMOTE_CONTROL",
    )
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert found["CELERY_BROKER_TRANSPORT"] == "idempotency.celery.sqs:Transport"
    assert found["CELERY_BROKER_TRANSPORT_OPTIONS"]["visibility_timeout"] == 900
    assert found["CELERY_BROKER_TRANSPORT_OPTIONS"]["wait_time_seconds"] == 20
    assert found["SQS_MAX_RECEIVE_COUNT"] == 7
    assert found["CELERY_WORKER_ENABLE_REMOTE_CONTROL"] is False


def test_the_example_settings_with_a_quorum_queue() -> None:
    result = _settings(
        {"CELERY_QUEUE_TYPE": "quorum", "CELERY_QUEUE_DELIVERY_LIMIT": "4"}, "QUEUE_ARGUMENTS"
    )
    assert result.returncode == 0, result.stderr
    arguments = json.loads(result.stdout)["QUEUE_ARGUMENTS"]
    assert arguments["x-queue-type"] == "quorum"
    assert arguments["x-delivery-limit"] == 4
    bad = _settings({"CELERY_QUEUE_TYPE": "lazy"}, "CELERY_TASK_QUEUES")
    assert bad.returncode != 0
    assert "queue type must be one of classic, quorum, not 'lazy'" in bad.stderr, bad.stderr
