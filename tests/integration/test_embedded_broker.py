"""The embedded default's broker (project/embedded_broker.py): kombu's filesystem transport that
hands control back to Celery's loop while a full prefetch waits for an acknowledgement, under a
URL scheme of its own (``embedded://``)."""

from __future__ import annotations

import socket
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection, Consumer, Exchange, Producer, Queue

from project import embedded_broker

#: Long enough that a wait of one polling interval is told apart from one of ack_interval.
POLLING_INTERVAL = 0.5


def connection(tmp_path: Path, url: str = "embedded://") -> Connection:
    embedded_broker.register()
    for folder in ("queue", "control"):
        (tmp_path / folder).mkdir(exist_ok=True)
    return Connection(
        url,
        transport_options={
            "data_folder_in": str(tmp_path / "queue"),
            "data_folder_out": str(tmp_path / "queue"),
            "control_folder": str(tmp_path / "control"),
            "polling_interval": POLLING_INTERVAL,
        },
    )


def work_queue(conn: Connection, messages: int) -> Queue:
    # A name of its own: kombu keeps the exchanges' bindings per process, not per directory.
    name = f"work-{uuid.uuid4().hex}"
    queue = Queue(name, Exchange(name, "direct"), routing_key=name)
    producer = Producer(conn.channel(), exchange=queue.exchange, routing_key=name)
    producer.declare()
    queue.bind(producer.channel).declare()
    for n in range(messages):
        producer.publish({"n": n}, serializer="json")
    return queue


def consume(conn: Connection, queue: Queue, received: list[Any]) -> Consumer:
    consumer = Consumer(conn.channel(), [queue], callbacks=[lambda b, m: received.append(m)])
    consumer.qos(prefetch_count=1)
    consumer.consume()
    return consumer


def full_prefetch(conn: Connection, received: list[Any]) -> Consumer:
    """Two messages queued, one delivered and not acknowledged, prefetch 1: as a busy worker."""
    consumer = consume(conn, work_queue(conn, 2), received)
    conn.drain_events(timeout=2)
    assert len(received) == 1  # (files published within one second come in any order)
    return consumer


def waited(conn: Connection) -> float:
    started = time.monotonic()
    with pytest.raises(socket.timeout):
        conn.drain_events(timeout=2.0)  # what Celery's loop asks for
    return time.monotonic() - started


def test_the_scheme_names_the_transport(tmp_path: Path) -> None:
    with connection(tmp_path) as conn:
        assert type(conn.transport) is embedded_broker.Transport
        assert conn.transport.ack_interval == embedded_broker.ACK_INTERVAL
    with connection(tmp_path, "filesystem://") as conn:
        assert type(conn.transport) is not embedded_broker.Transport


def test_a_full_prefetch_hands_control_back_after_the_ack_interval(tmp_path: Path) -> None:
    received: list[Any] = []
    with connection(tmp_path) as conn:
        full_prefetch(conn, received)
        # Not Celery's 2 s, nor one polling interval: the finished task's ack is taken at once.
        assert waited(conn) < POLLING_INTERVAL / 2
        # The acknowledgement the loop can now perform lets the next message through.
        received[0].ack()
        conn.drain_events(timeout=2)
        assert sorted(m.payload["n"] for m in received) == [0, 1]


def test_kombus_own_transport_waits_out_the_whole_timeout(tmp_path: Path) -> None:
    """Why the subclass exists: the stock transport sleeps the 2 s away with nothing to do."""
    received: list[Any] = []
    with connection(tmp_path, "filesystem://") as conn:
        full_prefetch(conn, received)
        assert waited(conn) >= 2.0


def test_an_idle_consumer_still_waits_for_messages(tmp_path: Path) -> None:
    """With room in the prefetch the wait is kombu's: a message published meanwhile arrives."""
    with connection(tmp_path) as conn:
        received: list[Any] = []
        consume(conn, work_queue(conn, 0), received)
        assert waited(conn) >= 2.0
        assert received == []


def test_a_rejected_message_comes_back(tmp_path: Path) -> None:
    """A pool process killed mid-task: the worker rejects its message with requeue
    (task_reject_on_worker_lost), and the transport delivers it again."""
    received: list[Any] = []
    with connection(tmp_path) as conn:
        consume(conn, work_queue(conn, 1), received)
        conn.drain_events(timeout=2)
        received.pop().reject(requeue=True)
        conn.drain_events(timeout=2)
        # (kombu's filesystem transport does not flag a redelivery: docs/celery.md)
        assert [m.payload["n"] for m in received] == [0]


def test_an_unacknowledged_message_comes_back_when_the_worker_stops(tmp_path: Path) -> None:
    """A worker stopped (warm shutdown) with a task unacknowledged: the channel restores it."""
    received: list[Any] = []
    with connection(tmp_path) as conn:
        queue = work_queue(conn, 1)
        consume(conn, queue, received)
        conn.drain_events(timeout=2)
        assert len(received) == 1
    again: list[Any] = []
    with connection(tmp_path) as conn:
        consume(conn, queue, again)
        conn.drain_events(timeout=2)
        assert [m.payload["n"] for m in again] == [0]


def test_the_example_uses_it_on_the_embedded_default() -> None:
    from django.conf import settings

    if not settings.CELERY_BROKER_URL.startswith("embedded://"):
        pytest.skip("CELERY_BROKER_URL names another broker")
    from project.celery import app

    with app.connection_for_write() as conn:
        assert type(conn.transport) is embedded_broker.Transport
        assert conn.transport.polling_interval == 0.05
    # No CELERY_BROKER_TRANSPORT pins it: another URL is enough to leave it.
    assert app.conf.broker_transport is None
    with app.connection_for_write(url="amqp://guest:guest@127.0.0.1:5672//") as conn:
        assert conn.transport.driver_type == "amqp"
