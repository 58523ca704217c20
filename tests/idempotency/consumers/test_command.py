"""``manage.py consume_events``: bad arguments, a real loop, and a graceful stop on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from kombu import Connection, Exchange, Queue

from idempotency.management.commands.consume_events import _transport_options
from tests.idempotency.consumers import handlers
from tests.idempotency.consumers.test_kombu import publish, remaining
from tests.services import AMQP_URL, ROOT, database_url, require_broker, require_postgres, wait_for

HANDLER = "tests.idempotency.consumers.handlers.credit"


def consume(*args: str, **options: Any) -> str:
    out = StringIO()
    call_command("consume_events", *args, stdout=out, stderr=StringIO(), **options)
    return out.getvalue()


KOMBU = ["kombu", "--handler", HANDLER]
NATS = ["nats", "--handler", HANDLER, "--stream", "s", "--subject", "x", "--durable", "d"]
MEMORY = [*KOMBU, "--url", "memory://", "--queue", "q"]
VISIBILITY_OPTION = "--transport-option visibility_timeout must be a number of seconds"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["kombu", "--handler", "no.such.module.handler"], "cannot be imported"),
        (["kombu", "--handler", "tests.idempotency.consumers.handlers.nope"], "cannot be imported"),
        (["kombu", "--handler", "tests.idempotency.consumers.handlers.not_callable"], "callable"),
        ([*KOMBU, "--queue", "q"], "--url"),
        ([*KOMBU, "--url", "memory://"], "--queue"),
        ([*KOMBU, "--url", "nosuch://x", "--queue", "q"], "--url"),
        ([*KOMBU, "--url", "amqp://h:port/", "--queue", "q"], "--url"),
        ([*MEMORY, "--limit", "0"], "--limit"),
        ([*MEMORY, "--limit", "-5"], "--limit"),
        ([*MEMORY, "--idle-timeout", "nan"], "--idle-timeout"),
        ([*MEMORY, "--idle-timeout", "1e30"], "--idle-timeout"),
        ([*MEMORY, "--idle-timeout", "0"], "--idle-timeout"),
        ([*MEMORY, "--transient-window", "-1"], "--transient-window"),
        ([*MEMORY, "--visibility-timeout", "0"], "--visibility-timeout"),
        ([*MEMORY, "--visibility-timeout", "100000"], "--visibility-timeout"),
        ([*MEMORY, "--transport-option", "region"], "NAME=VALUE"),
        ([*MEMORY, "--transport-option", "=1"], "NAME=VALUE"),
        ([*MEMORY, "--transport", "no.such.module:Transport"], "--transport"),
        ([*MEMORY, "--transport", "project.sqs:NoSuchTransport"], "--transport"),
        ([*MEMORY, "--transport", "nosuch"], "--transport 'nosuch': unknown transport"),
        ([*MEMORY, "--transport", ":"], "--transport ':': unknown transport"),
        ([*MEMORY, "--transport-option", "visibility_timeout=soon"], VISIBILITY_OPTION),
        ([*MEMORY, "--transport-option", "visibility_timeout=-5"], VISIBILITY_OPTION),
        ([*MEMORY, "--transport-option", "visibility_timeout=0"], VISIBILITY_OPTION),
        ([*MEMORY, "--transport-option", "visibility_timeout=100000"], VISIBILITY_OPTION),
        ([*MEMORY, "--transport-option", "visibility_timeout=true"], VISIBILITY_OPTION),
        ([*MEMORY, "--transport-option", "visibility_timeout=NaN"], "visibility_timeout: NaN"),
        ([*MEMORY, "--transport-option", "visibility_timeout=1e400"], "not a finite number"),
        ([*MEMORY, "--transport-option", "polling_interval=Infinity"], "polling_interval"),
        ([*MEMORY, "--transport-option", "queue_order=[1, -Infinity]"], "queue_order"),
        (
            [*MEMORY, "--visibility-timeout", "60", "--transport-option", "visibility_timeout=30"],
            "give only one",
        ),
        ([*MEMORY, "--consumer", " "], "consumer name"),
        ([*MEMORY, "--consumer", "c" * 201], "consumer name is at most 200"),
        ([*MEMORY, "--consumer", "c\x00"], "consumer name cannot hold a NUL"),
        (["nats", "--handler", HANDLER], "--stream, --subject, --durable"),
        (["nats", "--handler", HANDLER, "--stream", "s", "--subject", "x"], "--durable"),
        ([*NATS, "--ack-wait", "0"], "--ack-wait"),
        ([*NATS, "--ack-wait", "inf"], "--ack-wait"),
        ([*NATS, "--servers", " , "], "--servers"),
    ],
    ids=lambda value: " ".join(value[2:]) if isinstance(value, list) else value,
)
def test_bad_arguments_are_a_command_error(args: list[str], message: str) -> None:
    with pytest.raises(CommandError, match=message):
        consume(*args)


def test_an_unknown_transport_lists_the_accepted_aliases() -> None:
    with pytest.raises(CommandError) as raised:
        consume(*MEMORY, "--transport", "nosuch")
    assert "accepted: an alias (" in str(raised.value)
    assert "redis" in str(raised.value)
    assert "module:Class" in str(raised.value)


@pytest.mark.parametrize(
    ("pairs", "expected"),
    [
        (["visibility_timeout=30"], {"visibility_timeout": 30}),
        (["visibility_timeout=2.5"], {"visibility_timeout": 2.5}),
        (["visibility_timeout=86400"], {"visibility_timeout": 86400}),
        (["region=eu-west-1", "flag=false"], {"region": "eu-west-1", "flag": False}),
        (['names=["a", 1.5]'], {"names": ["a", 1.5]}),
        (["word=NaNny"], {"word": "NaNny"}),  # not JSON: text, as any other word
        (["word=1e400x"], {"word": "1e400x"}),
    ],
)
def test_transport_options_in_range_are_kept_as_read(
    pairs: list[str], expected: dict[str, Any]
) -> None:
    assert _transport_options(pairs) == expected


def test_an_unknown_adapter_is_a_command_error() -> None:
    with pytest.raises(CommandError, match="invalid choice"):
        consume("kafka", "--handler", HANDLER)


@pytest.fixture
def queue() -> Iterator[Queue]:
    require_postgres()
    require_broker(AMQP_URL)
    name = f"idem_consumers_{uuid.uuid4().hex}"
    made = Queue(name, Exchange(name, type="direct"), routing_key=name, durable=True)
    with Connection(AMQP_URL) as conn:
        made.bind(conn.default_channel).declare()
    yield made
    with Connection(AMQP_URL) as conn:
        made.bind(conn.default_channel).delete()


@pytest.mark.services
@pytest.mark.django_db(transaction=True)
def test_the_command_consumes_a_queue_and_reports_each_outcome(queue: Queue) -> None:
    handlers.ensure_customer()
    body = {"eventId": str(uuid.uuid4())}
    publish(AMQP_URL, queue, body, body, {"no": "key"})
    out = consume(
        "kombu",
        "--handler",
        HANDLER,
        "--url",
        AMQP_URL,
        "--queue",
        queue.name,
        "--idle-timeout",
        "1.5",
        verbosity=2,
    )
    assert f"processed {body['eventId']}" in out
    assert f"duplicate {body['eventId']}" in out
    assert "dead-lettered" in out
    assert "stopped after 3 message(s): 1 dead-lettered, 1 duplicate, 1 processed" in out
    assert handlers.effects(body["eventId"]) == 1
    assert remaining(AMQP_URL, queue) == 0


@pytest.mark.services
@pytest.mark.django_db(transaction=True)
def test_sigterm_finishes_the_message_in_hand_acknowledges_it_and_exits_0(
    queue: Queue, tmp_path: Path
) -> None:
    handlers.ensure_customer()
    running = tmp_path / "running"
    slow = {"eventId": str(uuid.uuid4()), "touch": str(running), "sleep": 2}
    waiting = [{"eventId": str(uuid.uuid4())} for _ in range(3)]
    publish(AMQP_URL, queue, slow, *waiting)
    log = tmp_path / "consumer.log"
    command = [
        sys.executable,
        "manage.py",
        "consume_events",
        "kombu",
        "--handler",
        HANDLER,
        "--url",
        AMQP_URL,
        "--queue",
        queue.name,
        "-v",
        "2",
    ]
    env = {**os.environ, "DATABASE_URL": database_url()}
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(running.exists, 60, "the consumer to take the first message")
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    text = log.read_text()
    assert code == 0, text
    # It did not stop in the middle: the message in hand was finished (it sleeps 2 s).
    assert time.monotonic() - started > 0.5, text
    assert f"processed {slow['eventId']}" in text
    assert "stopped after 1 message(s): 1 processed" in text, text
    assert handlers.effects(slow["eventId"]) == 1
    assert sum(handlers.effects(event["eventId"]) for event in waiting) == 0
    # The finished one was acknowledged; the three it never took are still queued.
    assert remaining(AMQP_URL, queue) == 3


@pytest.mark.services
@pytest.mark.django_db(transaction=True)
def test_the_command_consumes_a_jetstream_subject() -> None:
    pytest.importorskip("nats")
    from tests.idempotency.consumers.test_nats import NATS_URL, Stream

    require_postgres()
    require_broker(NATS_URL)
    handlers.ensure_customer()
    stream = Stream()
    stream.create()
    try:
        body = {"eventId": str(uuid.uuid4())}
        stream.publish(body, body)
        out = consume(
            "nats",
            "--handler",
            HANDLER,
            "--servers",
            NATS_URL,
            "--stream",
            stream.name,
            "--subject",
            stream.subject,
            "--durable",
            stream.durable,
            "--idle-timeout",
            "1.5",
        )
        assert "stopped after 2 message(s): 1 duplicate, 1 processed" in out
        assert handlers.effects(body["eventId"]) == 1
        assert stream.pending() == 0
    finally:
        stream.delete()
