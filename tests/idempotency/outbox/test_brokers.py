"""The outbox against the real brokers: a broker away at the front door, bad rows, outages.

Each test publishes to an exchange and queue of its own (``declare: []`` keeps Celery from
declaring the project's queue), so nothing reaches another run's workers.
"""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from io import StringIO
from typing import Any
from unittest import mock

import psycopg
import pytest
from celery import current_app
from django.core.management import call_command
from django.db import connection, transaction
from kombu import Connection, Exchange, Queue, pools

from idempotency import outbox
from idempotency.models import OutboxMessage
from idempotency.outbox import publish
from tests.celery_app import mocked_celery_app
from tests.services import BROKERS, in_thread, require_broker, require_postgres

pytestmark = pytest.mark.services

#: The brief says "a generous upper bound": PUBLISH_TIMEOUT is 1 s, this allows for a slow CI.
FRONT_DOOR_BOUND = 3.0


@contextmanager
def producing_to(url: str) -> Iterator[None]:
    """Point this process's Celery app at the broker *url* while the block runs."""

    def reset() -> None:
        # kombu keeps producer pools by connection in a registry of its own: empty it too, or
        # a later block reuses a pool whose connections this one closed.
        pools.reset()
        if current_app._pool is not None:
            current_app._pool.force_close_all()
            current_app._pool = None
        current_app.amqp._producer_pool = None
        outbox.publisher.reset()

    # The project's settings reach Celery under their CELERY_ names, which win over the plain
    # ones: the transport options must be replaced under that name. The transport follows the
    # scheme of *url* (the embedded default's has a scheme of its own, embedded://).
    keys = ("broker_write_url", "CELERY_BROKER_TRANSPORT_OPTIONS")
    saved = {key: current_app.conf.get(key) for key in keys}
    reset()
    options = {"confirm_publish": True} if url.startswith("amqp") else {}
    current_app.conf.update(
        {
            "broker_write_url": url,
            "CELERY_BROKER_TRANSPORT_OPTIONS": options,
        }
    )
    assert current_app.conf.broker_transport_options == options
    try:
        yield
    finally:
        reset()
        current_app.conf.update(saved)


@pytest.fixture
def destination(request: pytest.FixtureRequest) -> Iterator[tuple[str, str]]:
    """(broker url, queue name): a queue and exchange of the test's own on a real broker."""
    url = BROKERS[request.param]
    require_broker(url)
    name = f"test-outbox-{uuid.uuid4().hex[:12]}"
    queue = Queue(name, Exchange(name, type="direct"), routing_key=name)
    with Connection(url) as conn:
        queue(conn.default_channel).declare()
    try:
        yield url, name
    finally:
        with Connection(url) as conn:
            channel = conn.default_channel
            queue(channel).purge()
            queue(channel).delete()
            queue.exchange(channel).delete()
            if url.startswith("redis"):
                # kombu's virtual transport forgets bindings it did not declare itself.
                channel.client.delete(f"_kombu.binding.{name}")


def waiting(url: str, name: str) -> int:
    """Messages in the queue *name*."""
    with Connection(url) as conn:
        return int(Queue(name)(conn.default_channel).queue_declare(passive=True).message_count)


def to(name: str) -> dict[str, Any]:
    return {"exchange": name, "routing_key": name, "declare": []}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def silent_listener() -> Iterator[int]:
    """A port that accepts connections (the kernel completes them) and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        yield int(s.getsockname()[1])


def broker_url(kind: str, port: int) -> str:
    return (
        f"amqp://guest:guest@127.0.0.1:{port}//"
        if kind == "rabbitmq"
        else (f"redis://127.0.0.1:{port}/15")
    )


def commit(n: int, name: str) -> float:
    """Seconds for one transaction storing *n* messages, its publish after commit included."""
    started = time.monotonic()
    with transaction.atomic():
        for i in range(n):
            outbox.enqueue("t.name", [i], event_id=f"e-{uuid.uuid4()}", options=to(name))
    return time.monotonic() - started


# --- A broker away at the front door ---------------------------------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("away", ["port closed", "silent listener"])
@pytest.mark.parametrize("destination", ["rabbitmq", "redis"], indirect=True)
def test_a_commit_with_the_broker_away_is_quick_and_loses_nothing(
    destination: tuple[str, str], away: str
) -> None:
    url, name = destination
    kind = "rabbitmq" if url.startswith("amqp") else "redis"
    with silent_listener() as silent:
        port = free_port() if away == "port closed" else silent
        with producing_to(broker_url(kind, port)):
            first = commit(5, name)
            # The breaker is open now: the next commits do not try at all.
            second = commit(5, name)
    assert first < FRONT_DOOR_BOUND, f"one commit of 5 messages took {first:.2f}s ({away})"
    assert second < 0.5, f"a commit with the breaker open took {second:.2f}s"
    pending = OutboxMessage.objects.pending()
    assert pending.count() == 10
    assert sorted(pending.values_list("attempts", flat=True)) == [0] * 5 + [1] * 5
    assert not OutboxMessage.objects.failed().exists()
    # The broker is back (the real one): the relay publishes every message, once.
    with producing_to(url):
        out = StringIO()
        call_command("relay_outbox", stdout=out)
    assert "published 10 message(s)" in out.getvalue()
    assert waiting(url, name) == 10


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("destination", ["rabbitmq", "redis"], indirect=True)
def test_a_healthy_broker_gets_the_messages_at_once_over_one_kept_connection(
    destination: tuple[str, str],
) -> None:
    url, name = destination
    with producing_to(url):
        commit(5, name)
        commit(1, name)
    assert waiting(url, name) == 6
    assert not OutboxMessage.objects.filter(published_at__isnull=True).exists()


# --- Bad rows: set aside, the others go on ---------------------------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("destination", ["rabbitmq"], indirect=True)
def test_bad_rows_are_set_aside_on_rabbitmq(destination: tuple[str, str]) -> None:
    url, name = destination
    gone = f"{name}-gone"
    rows = [
        ("good-1", to(name)),
        ("missing queue", {"queue": gone}),  # celery: QueueNotFound
        ("missing exchange", {"exchange": gone, "routing_key": gone, "declare": []}),
        ("bad priority", {**to(name), "priority": "high"}),  # py-amqp: struct.error
        ("good-2", to(name)),
    ]
    with producing_to(url):
        # After commit, on this process's kept connection...
        with transaction.atomic():
            for arg, options in rows:
                outbox.enqueue("t.name", [arg], options=options)
        assert waiting(url, name) == 2
        # ...and by the relay, on Celery's pool: the same rows the same way.
        OutboxMessage.objects.redrive()
        OutboxMessage.objects.filter(published_at__isnull=False).update(published_at=None)
        out = StringIO()
        call_command("relay_outbox", stdout=out)
    assert "published 2 message(s)" in out.getvalue()
    assert "0 pending, 3 failed" in out.getvalue()
    assert waiting(url, name) == 4
    failed = {m.args[0]: m for m in OutboxMessage.objects.failed()}
    assert set(failed) == {"missing queue", "missing exchange", "bad priority"}
    assert "QueueNotFound" in failed["missing queue"].last_error
    assert "NOT_FOUND" in failed["missing exchange"].last_error
    assert "struct.error" in failed["bad priority"].last_error
    assert all(m.attempts == 2 for m in failed.values())
    # The immediate publish went well for the good rows: the breaker stays closed.
    assert not outbox.publisher.is_open(publish._broker_key())


# --- The relay under a database outage -------------------------------------------------------


class DatabaseOutage:
    """The test database refusing connections, and every session of it terminated."""

    def __init__(self) -> None:
        s = connection.settings_dict
        self.name = str(s["NAME"])
        self.params: dict[str, Any] = {
            "host": s.get("HOST") or "127.0.0.1",
            "port": int(s.get("PORT") or 5432),
            "user": s.get("USER") or "postgres",
            "dbname": "postgres",
            "autocommit": True,
        }
        if s.get("PASSWORD"):
            self.params["password"] = s["PASSWORD"]

    def _run(self, sql: str) -> None:
        with psycopg.connect(**self.params) as conn:
            conn.execute(sql)

    def begin(self) -> None:
        self._run(f'ALTER DATABASE "{self.name}" ALLOW_CONNECTIONS false')
        self._run(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            f"WHERE datname = '{self.name}' AND pid <> pg_backend_pid()"
        )

    def end(self) -> None:
        self._run(f'ALTER DATABASE "{self.name}" ALLOW_CONNECTIONS true')


@pytest.mark.django_db(transaction=True)
def test_relay_forever_survives_a_database_outage() -> None:
    require_postgres()
    outage = DatabaseOutage()
    outbox.enqueue("t.name", ["before"], publish_on_commit=False)
    sleeps: list[float] = []
    errors: list[BaseException] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 1:
            outage.begin()  # the relay's connection is cut, and no new one is accepted
        elif len(sleeps) == 3:
            outage.end()
            in_thread(
                lambda: outbox.enqueue("t.name", ["after"], publish_on_commit=False), errors
            ).join(timeout=30)
        elif len(sleeps) >= 4:
            raise KeyboardInterrupt

    err = StringIO()
    with (
        mocked_celery_app() as app,
        mock.patch("idempotency.management.commands.relay_outbox.time.sleep", sleep),
    ):
        try:
            call_command(
                "relay_outbox", "--forever", "--interval", "0.01", stdout=StringIO(), stderr=err
            )
        finally:
            outage.end()
    assert not errors
    assert [c.kwargs["args"] for c in app.send_task.call_args_list] == [["before"], ["after"]]
    assert err.getvalue().count("database unavailable") == 2, err.getvalue()
    assert not OutboxMessage.objects.pending().exists()
