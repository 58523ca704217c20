"""The embedded default's broker (project/embedded_broker.py): kombu's filesystem transport that
hands control back to Celery's loop while a full prefetch waits for an acknowledgement."""

from __future__ import annotations

import socket
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection, Consumer, Exchange, Producer, Queue


def connection(tmp_path: Path, transport: str) -> Connection:
    for folder in ("queue", "control"):
        (tmp_path / folder).mkdir(exist_ok=True)
    return Connection(
        "filesystem://",
        transport=transport,
        transport_options={
            "data_folder_in": str(tmp_path / "queue"),
            "data_folder_out": str(tmp_path / "queue"),
            "control_folder": str(tmp_path / "control"),
            "polling_interval": 0.05,
        },
    )


def full_prefetch(conn: Connection, received: list[Any]) -> Consumer:
    """Two messages queued, one delivered and not acknowledged, prefetch 1: as a busy worker."""
    # A name of its own: kombu keeps the exchanges' bindings per process, not per directory.
    name = f"work-{uuid.uuid4().hex}"
    queue = Queue(name, Exchange(name, "direct"), routing_key=name)
    producer = Producer(conn.channel(), exchange=queue.exchange, routing_key=name)
    producer.declare()
    queue.bind(producer.channel).declare()
    for n in range(2):
        producer.publish({"n": n}, serializer="json")
    consumer = Consumer(conn.channel(), [queue], callbacks=[lambda b, m: received.append(m)])
    consumer.qos(prefetch_count=1)
    consumer.consume()
    conn.drain_events(timeout=2)
    assert len(received) == 1  # (files published within one second come in any order)
    return consumer


def waited(conn: Connection) -> float:
    started = time.monotonic()
    with pytest.raises(socket.timeout):
        conn.drain_events(timeout=2.0)  # what Celery's loop asks for
    return time.monotonic() - started


def test_a_full_prefetch_hands_control_back_after_one_polling_interval(tmp_path: Path) -> None:
    received: list[Any] = []
    with connection(tmp_path, "project.embedded_broker:Transport") as conn:
        full_prefetch(conn, received)
        assert waited(conn) < 1.0  # one polling interval (0.05 s), not Celery's 2 s
        # The acknowledgement the loop can now perform lets the next message through.
        received[0].ack()
        conn.drain_events(timeout=2)
        assert sorted(m.payload["n"] for m in received) == [0, 1]


def test_kombus_own_transport_waits_out_the_whole_timeout(tmp_path: Path) -> None:
    """Why the subclass exists: the stock transport sleeps the 2 s away with nothing to do."""
    received: list[Any] = []
    with connection(tmp_path, "filesystem") as conn:
        full_prefetch(conn, received)
        assert waited(conn) >= 2.0


def test_an_idle_consumer_still_waits_for_messages(tmp_path: Path) -> None:
    """With room in the prefetch the wait is kombu's: a message published meanwhile arrives."""
    with connection(tmp_path, "project.embedded_broker:Transport") as conn:
        queue = Queue("idle", Exchange("idle", "direct"), routing_key="idle")
        received: list[Any] = []
        consumer = Consumer(conn.channel(), [queue], callbacks=[lambda b, m: received.append(m)])
        consumer.declare()
        consumer.qos(prefetch_count=1)
        consumer.consume()
        assert waited(conn) >= 2.0


def test_the_example_uses_it_on_the_embedded_default() -> None:
    from django.conf import settings

    if not settings.CELERY_BROKER_URL.startswith("filesystem://"):
        pytest.skip("CELERY_BROKER_URL names another broker")
    from project.celery import app

    with app.connection_for_write() as conn:
        assert type(conn.transport).__module__ == "project.embedded_broker"
        assert conn.transport.polling_interval == 0.05
