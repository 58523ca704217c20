"""Plain consumers (``manage.py consume_events``) SIGKILLed inside the transaction and between
the commit and the ack, on a real RabbitMQ and Redis (kombu) and a real NATS JetStream.

Each scenario publishes a batch of events (some twice), arms kill points on a few of them, and
runs the consumer again after every death until it drains the queue and exits 0 on its idle
timeout. Then: every event applied exactly once (ledger entries and the balance), no dead
letter, nothing left on the broker, and every armed kill fired. ~10 s per scenario on RabbitMQ
and NATS; on Redis a killed consumer's message comes back only after kombu's visibility
timeout (2 s here) and the next restore pass, so each run waits longer for it (~40 s).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection, Exchange, Queue

from idempotency.models import DeadLetter, ProcessedEvent
from orders.models import Customer
from tests.faults.conftest import REPORT
from tests.faults.report import Row
from tests.idempotency.consumers import handlers
from tests.idempotency.consumers.test_kombu import publish, remaining
from tests.services import (
    AMQP_URL,
    REDIS_URL,
    ROOT,
    database_url,
    require_broker,
    require_postgres,
)

pytestmark = [pytest.mark.faults, pytest.mark.services, pytest.mark.django_db(transaction=True)]

HANDLER = "tests.faults.consumer_hooks.credit"
CONSUMER = "tests.faults.plain_consumer"
EVENTS = 20
#: (index of the event, kill point): two inside the transaction, two after the commit.
KILLS = ((3, "inside"), (7, "after-commit"), (12, "inside"), (15, "after-commit"))
TITLE = "consume_events SIGKILLed inside the transaction and before the ack"
#: Runs of the consumer at most: one per kill, one that drains the rest, and slack.
MAX_RUNS = len(KILLS) + 3


class Run:
    """The consumer started again after each death, on the test database."""

    def __init__(
        self,
        arguments: list[str],
        directory: Path,
        idle_timeout: float = 3,
        env: dict[str, str] | None = None,
    ) -> None:
        self.arguments = arguments
        self.directory = directory
        self.idle_timeout = idle_timeout
        self.env = env or {}
        self.exits: list[int] = []
        self.started = time.monotonic()

    def until_drained(self) -> None:
        env = {
            **os.environ,
            "DATABASE_URL": database_url(),
            "FAULTS_DIR": str(self.directory),
            **self.env,
        }
        command = [
            sys.executable,
            "manage.py",
            "consume_events",
            *self.arguments,
            "--handler",
            HANDLER,
            "--consumer",
            CONSUMER,
            "--idle-timeout",
            str(self.idle_timeout),
            "-v",
            "2",
        ]
        for number in range(MAX_RUNS):
            log = self.directory / f"run-{number}.log"
            with log.open("wb") as out:
                process = subprocess.Popen(
                    command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
                )
                try:
                    code = process.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
                    pytest.fail(f"the consumer hung:\n{self.logs()}", pytrace=False)
            self.exits.append(code)
            if code == 0:
                return
            assert code == -signal.SIGKILL, f"the consumer exited {code}:\n{self.logs()}"
        pytest.fail(f"still killed after {MAX_RUNS} runs:\n{self.logs()}", pytrace=False)

    def logs(self) -> str:
        return "\n".join(
            f"--- {log.name}\n{log.read_text()[-3000:]}"
            for log in sorted(self.directory.glob("run-*.log"))
        )


def arm(directory: Path, events: list[dict[str, Any]]) -> list[str]:
    plan = directory / "plan"
    plan.mkdir(parents=True)
    armed = []
    for index, point in KILLS:
        name = f"{events[index]['eventId']}@{point}"
        (plan / name).write_text("kill")
        armed.append(name)
    return armed


def batch() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The events, and the messages to publish: every fifth event twice (a producer's retry)."""
    events = [{"eventId": str(uuid.uuid4()), "n": n} for n in range(EVENTS)]
    messages = [*events, *events[::5]]
    return events, messages


def record(row: Row, sent: int, events: list[dict[str, Any]], run: Run) -> None:
    """The scenario's line of docs/reliability.md (``make faults``), filled before the checks."""
    logs = run.logs()
    counts = [handlers.effects(e["eventId"]) for e in events]
    row.sent = sent
    # Every settled message prints its outcome (-v 2); a killed delivery prints nothing.
    settled = len(
        re.findall(r"^(?:processed|duplicate|dead-lettered|retry|transient) ", logs, re.M)
    )
    row.deliveries = settled + run.exits.count(-signal.SIGKILL)
    row.discarded = len(re.findall(r"^duplicate ", logs, re.M))
    row.effects = counts.count(1)
    row.dead_letters = DeadLetter.objects.count()
    row.lost = counts.count(0)
    row.doubled = sum(1 for count in counts if count > 1)
    row.seconds = time.monotonic() - run.started


def verify(events: list[dict[str, Any]], armed: list[str], directory: Path, run: Run) -> None:
    fired = sorted(path.name for path in (directory / "fired").iterdir())
    assert fired == sorted(armed), run.logs()
    assert run.exits.count(-signal.SIGKILL) == len(KILLS), run.exits
    lost = [e["eventId"] for e in events if handlers.effects(e["eventId"]) == 0]
    doubled = [e["eventId"] for e in events if handlers.effects(e["eventId"]) > 1]
    assert (lost, doubled) == ([], []), run.logs()
    customer = Customer.objects.get(customer_id=handlers.CUSTOMER_ID)
    assert customer.balance == Decimal(EVENTS) * handlers.CREDIT
    assert ProcessedEvent.objects.for_consumer(CONSUMER).count() == EVENTS
    assert not DeadLetter.objects.exists(), list(DeadLetter.objects.values("reason", "event_id"))
    # The redelivery of a message killed after its commit was discarded, not applied again.
    logs = run.logs()
    for index, point in KILLS:
        if point == "after-commit":
            assert f"duplicate {events[index]['eventId']}" in logs, logs


@pytest.fixture
def rabbit_queue() -> Iterator[Queue]:
    require_postgres()
    require_broker(AMQP_URL)
    name = f"idem_consumers_faults_{uuid.uuid4().hex}"
    made = Queue(name, Exchange(name, type="direct"), routing_key=name, durable=True)
    with Connection(AMQP_URL) as conn:
        made.bind(conn.default_channel).declare()
    yield made
    with Connection(AMQP_URL) as conn:
        made.bind(conn.default_channel).delete()


@pytest.fixture
def row(request: pytest.FixtureRequest) -> Callable[[str, str, str], Row]:
    """``row(number, title, broker)``: a line of the suite's report for this scenario."""

    def make(number: str, title: str, broker: str) -> Row:
        made = Row(number=number, title=title, broker=broker, nodeid=request.node.nodeid)
        request.config.stash[REPORT].rows.append(made)
        return made

    return make


def test_kombu_consumer_killed_inside_the_transaction_and_before_the_ack(
    rabbit_queue: Queue, tmp_path: Path, row: Callable[[str, str, str], Row]
) -> None:
    directory = tmp_path
    handlers.ensure_customer()
    events, messages = batch()
    armed = arm(directory, events)
    publish(AMQP_URL, rabbit_queue, *messages)
    run = Run(["kombu", "--url", AMQP_URL, "--queue", rabbit_queue.name], directory)
    run.until_drained()
    record(row("21a", TITLE, "rabbitmq"), len(messages), events, run)
    verify(events, armed, directory, run)
    assert remaining(AMQP_URL, rabbit_queue) == 0


@pytest.fixture
def redis_queue() -> Iterator[Queue]:
    require_postgres()
    require_broker(REDIS_URL)
    name = f"idem_consumers_faults_{uuid.uuid4().hex}"
    made = Queue(name, Exchange(name, type="direct"), routing_key=name, durable=True)
    yield made
    with Connection(REDIS_URL) as conn:
        made.bind(conn.default_channel).delete()


#: kombu's Redis transport gives a dead consumer's message back once it has been unacknowledged
#: this long (seconds; an hour by default), on a restore pass of a live consumer's poll.
REDIS_VISIBILITY = 2
#: A run waits this long with nothing to do before it exits 0: past the visibility timeout and
#: the next restore pass (every tenth empty poll, about 10 s apart), so a killed run's message is
#: not left behind in the unacked hash.
REDIS_IDLE = 15


def test_kombu_consumer_on_redis_killed_inside_the_transaction_and_before_the_ack(
    redis_queue: Queue, tmp_path: Path, row: Callable[[str, str, str], Row]
) -> None:
    directory = tmp_path
    handlers.ensure_customer()
    events, messages = batch()
    armed = arm(directory, events)
    publish(REDIS_URL, redis_queue, *messages)
    arguments = [
        "kombu",
        "--url",
        REDIS_URL,
        "--queue",
        redis_queue.name,
        "--visibility-timeout",
        str(REDIS_VISIBILITY),
    ]
    run = Run(arguments, directory, idle_timeout=REDIS_IDLE)
    run.until_drained()
    record(row("21c", TITLE, "redis"), len(messages), events, run)
    verify(events, armed, directory, run)
    assert remaining(REDIS_URL, redis_queue) == 0
    # Nothing left in the transport's unacked hash either: each kill's message was restored.
    with Connection(REDIS_URL) as conn:
        client = conn.default_channel.client  # type: ignore[attr-defined]
        assert client.hlen("unacked") == 0


#: The SQS queue's visibility timeout (seconds): how soon a killed consumer's message is back.
SQS_VISIBILITY = 2


def test_kombu_consumer_on_sqs_killed_inside_the_transaction_and_before_the_ack(
    sqs_emulator: Any, tmp_path: Path, row: Callable[[str, str, str], Row]
) -> None:
    """21d. The same on SQS (the emulator, tests/sqs.py) through the library's transport
    (idempotency.celery.sqs: it flags a redelivery and deletes an acknowledged message), named with
    ``--transport`` and configured with ``--transport-option``."""
    from project import sqs
    from project.queues import work_queue
    from tests.integration.test_sqs import _attributes, _connection
    from tests.sqs import SQS_ENV

    require_postgres()
    directory = tmp_path
    name = f"idem-consumers-faults-{uuid.uuid4().hex[:12]}"
    sqs.declare_queues(
        sqs_emulator.client, name, visibility_timeout=SQS_VISIBILITY, max_receive_count=20
    )
    try:
        handlers.ensure_customer()
        events, messages = batch()
        armed = arm(directory, events)
        queue = work_queue(name)
        with _connection(sqs_emulator) as conn:
            producer = conn.Producer()
            for body in messages:
                producer.publish(body, exchange=queue.exchange, routing_key=name, declare=[queue])
        options = {
            "region": SQS_ENV["AWS_DEFAULT_REGION"],
            "is_secure": "false",
            "wait_time_seconds": "0",
            "fetch_message_attributes": '["ApproximateReceiveCount"]',
        }
        arguments = [
            "kombu",
            "--url",
            sqs_emulator.url,
            "--queue",
            name,
            "--transport",
            "idempotency.celery.sqs:Transport",
            *(
                arg
                for key, value in options.items()
                for arg in ("--transport-option", f"{key}={value}")
            ),
            "--visibility-timeout",
            str(SQS_VISIBILITY),
        ]
        # Past the visibility timeout, so a killed run's message is back before a run ends.
        run = Run(arguments, directory, idle_timeout=SQS_VISIBILITY + 4, env=SQS_ENV)
        run.until_drained()
        record(row("21d", TITLE, "sqs"), len(messages), events, run)
        verify(events, armed, directory, run)
        attributes = _attributes(sqs_emulator, sqs.queue_names(name)[0])
        assert attributes["ApproximateNumberOfMessages"] == "0", attributes
        assert attributes["ApproximateNumberOfMessagesNotVisible"] == "0", attributes
    finally:
        for sqs_name in sqs.queue_names(name):
            url = sqs_emulator.client.get_queue_url(QueueName=sqs_name)["QueueUrl"]
            sqs_emulator.client.delete_queue(QueueUrl=url)


@pytest.fixture
def nats_stream() -> Iterator[Any]:
    pytest.importorskip("nats")
    from tests.idempotency.consumers.test_nats import NATS_URL, Stream

    require_postgres()
    require_broker(NATS_URL)
    made = Stream()
    made.create()
    yield made
    made.delete()


def test_jetstream_consumer_killed_inside_the_transaction_and_before_the_ack(
    nats_stream: Any, tmp_path: Path, row: Callable[[str, str, str], Row]
) -> None:
    directory = tmp_path
    from tests.idempotency.consumers.test_nats import NATS_URL

    handlers.ensure_customer()
    events, messages = batch()
    armed = arm(directory, events)
    nats_stream.publish(*messages)
    arguments = [
        "nats",
        "--servers",
        NATS_URL,
        "--stream",
        nats_stream.name,
        "--subject",
        nats_stream.subject,
        "--durable",
        nats_stream.durable,
        # A killed consumer's message comes back after ack_wait: short, so the run is too. The
        # idle timeout (3 s) outlasts it, so a run does not end before the redelivery.
        "--ack-wait",
        "2",
    ]
    run = Run(arguments, directory)
    run.until_drained()
    record(row("21b", TITLE, "nats"), len(messages), events, run)
    verify(events, armed, directory, run)
    assert nats_stream.pending() == 0
