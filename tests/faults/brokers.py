"""The brokers of the fault-injection suite, seen from the test: queue counts and restarts.

RabbitMQ is the shared node (restarted with ``rabbitmqctl stop_app``/``start_app``; its queues
are durable and its messages persistent). Redis is a private ``redis-server`` the suite starts
on a free port with an append-only file fsynced at every write, so a restart keeps every message
and the shared Redis is never touched. SQS is a private ``moto_server`` (an emulator of the SQS
API), started the same way.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
import redis
from botocore.exceptions import ClientError
from kombu import Connection

from idempotency.celery.sqs import declare_queues, queue_names
from project.queues import dead_letter_queue, work_queue
from project.sqs import transport_options as sqs_transport_options
from tests.services import AMQP_URL, reachable, unavailable
from tests.sqs import SQS_ENV, SQSEmulator


@dataclass(frozen=True)
class QueueState:
    """What the broker holds for one work queue."""

    ready: int
    unacked: int
    consumers: int
    #: Messages in the queue's dead-letter queue (RabbitMQ; Redis has none of its own).
    dead: int

    @property
    def empty(self) -> bool:
        return self.ready == 0 and self.unacked == 0


def run(command: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)


def poll(predicate: Any, timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


class Broker(ABC):
    kind: str
    url: str

    def connection(self) -> Connection:
        """A connection to publish with, configured like the project's producers."""
        return Connection(self.url)

    @abstractmethod
    def queue_state(self, name: str) -> QueueState: ...

    @abstractmethod
    def restart(self) -> None:
        """Stop the broker and start it again; return once it accepts connections."""

    @abstractmethod
    def stop(self) -> None:
        """Stop the broker (its data kept); return once it refuses clients."""

    @abstractmethod
    def start(self) -> None:
        """Start the stopped broker; return once it accepts connections."""

    @abstractmethod
    def version(self) -> str: ...

    @abstractmethod
    def ensure_running(self) -> None:
        """Start the broker if a failed scenario left it stopped."""

    def delete_queues(self, name: str) -> None:
        """Delete the work queue and its dead-letter queue (they are the scenario's own)."""
        with Connection(self.url) as conn:
            for queue in (work_queue(name), dead_letter_queue(name)):
                queue.bind(conn.default_channel).delete()


class RabbitMQ(Broker):
    kind = "rabbitmq"

    def __init__(self, url: str = AMQP_URL) -> None:
        self.url = url

    def connection(self) -> Connection:
        # Publisher confirms, as project/settings.py sets them for the service's producers.
        return Connection(self.url, transport_options={"confirm_publish": True})

    @property
    def vhost(self) -> str:
        """The URL's virtual host (``/`` when it names none), whose queues rabbitmqctl lists."""
        path = unquote(urlsplit(self.url).path)
        return path[1:] if len(path) > 1 else "/"

    def queue_state(self, name: str) -> QueueState:
        result = run(
            [
                "rabbitmqctl",
                "-q",
                "list_queues",
                "-p",
                self.vhost,
                "name",
                "messages_ready",
                "messages_unacknowledged",
                "consumers",
            ],
            timeout=60,
        )
        if result.returncode != 0:
            raise RuntimeError(f"rabbitmqctl list_queues failed: {result.stderr.strip()}")
        rows: dict[str, tuple[int, int, int]] = {}
        for line in result.stdout.splitlines():
            parts = line.split("\t")
            if len(parts) == 4 and parts[0] in (name, f"{name}.dead"):
                rows[parts[0]] = (int(parts[1]), int(parts[2]), int(parts[3]))
        ready, unacked, consumers = rows.get(name, (0, 0, 0))
        dead_ready, dead_unacked, _ = rows.get(f"{name}.dead", (0, 0, 0))
        return QueueState(ready, unacked, consumers, dead_ready + dead_unacked)

    def declared_counts(self, name: str) -> tuple[int, int]:
        """``(messages, consumers)`` from a passive ``queue.declare``, the AMQP view."""
        with Connection(self.url) as conn:
            _, messages, consumers = conn.default_channel.queue_declare(queue=name, passive=True)
        return int(messages), int(consumers)

    def ensure_running(self) -> None:
        if run(["rabbitmq-diagnostics", "-q", "check_port_connectivity"], 60).returncode != 0:
            run(["rabbitmqctl", "start_app"], timeout=180)

    def stop(self) -> None:
        stopped = run(["rabbitmqctl", "stop_app"], timeout=120)
        if stopped.returncode != 0:
            self.start()
            raise RuntimeError(f"rabbitmqctl stop_app failed: {stopped.stderr.strip()}")
        if not poll(lambda: not reachable(self.url), 30, interval=0.2):
            self.start()
            pytest.fail("RabbitMQ still accepts connections after stop_app")

    def start(self) -> None:
        started = run(["rabbitmqctl", "start_app"], timeout=180)
        if started.returncode != 0:
            raise RuntimeError(f"rabbitmqctl start_app failed: {started.stderr.strip()}")
        if not poll(
            lambda: run(["rabbitmq-diagnostics", "-q", "check_port_connectivity"], 60).returncode
            == 0,
            120,
            interval=0.5,
        ):
            pytest.fail("RabbitMQ did not accept connections within 120s of start_app")

    def restart(self) -> None:
        stopped = run(["rabbitmqctl", "stop_app"], timeout=120)
        try:
            if stopped.returncode != 0:
                raise RuntimeError(f"rabbitmqctl stop_app failed: {stopped.stderr.strip()}")
        finally:
            # Whatever happened, never leave the shared node stopped.
            started = run(["rabbitmqctl", "start_app"], timeout=180)
        if started.returncode != 0:
            raise RuntimeError(f"rabbitmqctl start_app failed: {started.stderr.strip()}")
        if not poll(
            lambda: run(["rabbitmq-diagnostics", "-q", "check_port_connectivity"], 60).returncode
            == 0,
            120,
            interval=0.5,
        ):
            pytest.fail("RabbitMQ did not accept connections within 120s of start_app")

    def version(self) -> str:
        with Connection(self.url) as conn:
            conn.connect()
            properties = conn.connection.server_properties
        value = properties.get("version", "?")
        return value.decode() if isinstance(value, bytes) else str(value)


def free_port(start: int = 6390, stop: int = 6490) -> int:
    for port in range(start, stop):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {start}-{stop - 1} for the suite's Redis")


class PrivateRedis(Broker):
    """A ``redis-server`` of the suite's own; ``restart()`` keeps its data (AOF, fsync always)."""

    kind = "redis"
    #: kombu keeps a message it delivered, until acknowledged, in this hash (all queues at once).
    UNACKED = "unacked"

    def __init__(self, directory: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            unavailable("redis-server is not installed")
        self.binary = str(binary)
        self.directory = directory
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None
        self.client = redis.Redis.from_url(self.url)

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        command = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.directory),
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--save",
            "",
            "--daemonize",
            "no",
            "--logfile",
            str(self.directory / "redis.log"),
        ]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if not poll(self._pong, 30):
            self.stop()
            pytest.fail(f"the suite's redis-server did not start on port {self.port}")

    def _pong(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            return False
        try:
            return bool(self.client.ping())
        except redis.RedisError:
            return False

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)

    def ensure_running(self) -> None:
        if not self._pong():
            self.stop()
            self.start()

    def restart(self) -> None:
        self.stop()
        if reachable(self.url):
            pytest.fail(f"port {self.port} still answers after the suite's Redis stopped")
        self.start()

    def queue_keys(self, name: str) -> list[bytes]:
        # kombu keeps one list per priority step: the name itself, then name + "\x06\x16" + n.
        return [
            key for key in self.client.keys(f"{name}*") if key.split(b"\x06")[0] == name.encode()
        ]

    def unacked_for(self, name: str) -> list[str]:
        """Delivery tags of the unacknowledged messages of queue *name*."""
        tags = []
        for tag, raw in self.client.hgetall(self.UNACKED).items():
            try:
                _, exchange, routing_key = json.loads(raw)
            except (ValueError, TypeError):
                continue
            if name in (exchange, routing_key):
                tags.append(tag.decode())
        return tags

    def holds(self, name: str, task_id: str) -> bool:
        """Whether queue *name*'s lists or the ``unacked`` hash hold the message *task_id*."""
        needle = task_id.encode()
        for key in self.queue_keys(name):
            if self.client.type(key) == b"list" and any(
                needle in item for item in self.client.lrange(key, 0, -1)
            ):
                return True
        return any(needle in raw for raw in self.client.hvals(self.UNACKED))

    def unacked_ages(self, name: str) -> list[float]:
        """Seconds since each unacknowledged message of queue *name* was delivered."""
        tags = set(self.unacked_for(name))
        now = time.time()
        return [
            now - score
            for tag, score in self.client.zrange(self.UNACKED + "_index", 0, -1, withscores=True)
            if tag.decode() in tags
        ]

    def queue_state(self, name: str) -> QueueState:
        ready = 0
        for key in self.queue_keys(name):
            if self.client.type(key) == b"list":
                ready += int(self.client.llen(key))
        return QueueState(ready, len(self.unacked_for(name)), 0, 0)

    def version(self) -> str:
        return str(self.client.info("server")["redis_version"])


class LocalSQS(Broker):
    """The suite's SQS: a local emulator of the SQS API (tests/sqs.py), started once per run.

    Each scenario's queues are declared as the example's worker declares them
    (``idempotency.celery.sqs.declare_queues``): the work queue with a visibility timeout and a
    redrive policy, and ``<queue>-dead``. The emulator keeps everything in memory: it cannot restart
    with its messages, so the scenarios that restart or stop the broker do not run on SQS.
    """

    kind = "sqs"
    #: What the workers, the relay and manage.py need to reach the emulator.
    ENV = {
        **SQS_ENV,
        # A worker's poll returns within a second, so a stopped worker stops at once.
        "CELERY_SQS_WAIT_TIME_SECONDS": "1",
    }

    def __init__(self, emulator: SQSEmulator) -> None:
        self.emulator = emulator
        self.url = emulator.url
        self.client = emulator.client
        #: The visibility timeout and receive limit the next declared queue gets.
        self.visibility_timeout = 60
        self.max_receive_count = 20

    def connection(self) -> Connection:
        options = sqs_transport_options(
            {**os.environ, **self.ENV}, visibility_timeout=self.visibility_timeout
        )
        return Connection(self.url, transport_options=options)

    def start(self) -> None:
        self.emulator.start()

    def stop(self) -> None:
        self.emulator.stop()

    def restart(self) -> None:
        pytest.fail("the SQS emulator keeps its queues in memory: it cannot restart with them")

    def ensure_running(self) -> None:
        if not self.emulator.answers():
            self.emulator.stop()
            self.emulator.start()

    def declare(self, name: str) -> dict[str, str]:
        return declare_queues(
            self.client,
            name,
            visibility_timeout=self.visibility_timeout,
            max_receive_count=self.max_receive_count,
        )

    def _url(self, sqs_name: str) -> str | None:
        try:
            return str(self.client.get_queue_url(QueueName=sqs_name)["QueueUrl"])
        except ClientError:
            return None

    def attributes(self, sqs_name: str) -> dict[str, str]:
        url = self._url(sqs_name)
        if url is None:
            return {}
        found = self.client.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])
        return dict(found["Attributes"])

    def queue_state(self, name: str) -> QueueState:
        work, dead = queue_names(name)
        attrs = self.attributes(work)
        dead_attrs = self.attributes(dead)
        ready = int(attrs.get("ApproximateNumberOfMessages", 0)) + int(
            attrs.get("ApproximateNumberOfMessagesDelayed", 0)
        )
        unacked = int(attrs.get("ApproximateNumberOfMessagesNotVisible", 0))
        dead_count = sum(
            int(dead_attrs.get(key, 0))
            for key in ("ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible")
        )
        return QueueState(ready, unacked, 0, dead_count)

    def dead_messages(self, name: str) -> list[dict[str, Any]]:
        """The messages of ``<name>-dead``, received and made visible again at once."""
        url = self._url(queue_names(name)[1])
        if url is None:
            return []
        found = self.client.receive_message(
            QueueUrl=url, MaxNumberOfMessages=10, AttributeNames=["All"], VisibilityTimeout=0
        )
        return list(found.get("Messages", []))

    def delete_queues(self, name: str) -> None:
        for sqs_name in queue_names(name):
            url = self._url(sqs_name)
            if url is not None:
                self.client.delete_queue(QueueUrl=url)

    def version(self) -> str:
        return f"moto {version('moto')} (an emulator of the SQS API)"
