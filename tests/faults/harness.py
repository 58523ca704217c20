"""A scenario of the fault-injection suite: its queue, its workers, its faults and its ledger.

A scenario publishes through :meth:`Scenario.send` (which keeps the ledger), arms faults with
:meth:`Scenario.arm`, observes them through the hooks' files and ``pg_stat_activity``, and ends
with :meth:`Scenario.verify`: the workers stop, the broker must hold nothing for the queue, and
the database must show exactly one effect per event. Every wait is bounded and fails with what
it was waiting for, the broker's counts, the journal and the workers' logs.

Adding a scenario that publishes another way (an outbox relay, an HTTP endpoint) only needs
another ``send``: the ledger and the checks stay the same. A scenario that expects a dead
letter declares it with ``scenario.ledger.expect_dead_letter(consumer, event_id)``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from django.db import connection

from idempotency.models import OutboxMessage, ProcessedEvent
from orders import tasks as order_tasks
from project.queues import work_queue
from tests.faults import consumers
from tests.faults.brokers import Broker, RabbitMQ
from tests.faults.ledger import Inspection, Ledger, inspect
from tests.faults.report import Report, Row
from tests.services import ROOT, celery_worker, database_url

#: Modules the suite's workers import on top of the project's tasks.
INCLUDE = ("tests.faults.hooks", "tests.faults.consumers")

TASKS: dict[str, Any] = {
    task.name: task
    for task in (
        order_tasks.place_order,
        order_tasks.payment_received,
        order_tasks.debit_account,
        order_tasks.ship_order,
        order_tasks.send_order_confirmation,
        consumers.audit_event,
    )
}


# --- Processes -------------------------------------------------------------------------------


def children_of(pid: int) -> list[int]:
    """The child processes of *pid*, read from every thread's ``children`` file."""
    found: list[int] = []
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return found
    for tid in threads:
        try:
            text = Path(f"/proc/{pid}/task/{tid}/children").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        found.extend(int(p) for p in text.split())
    return sorted(set(found))


def gone(pid: int) -> bool:
    """True once *pid* has exited (a zombie waiting to be reaped counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


@dataclass
class Worker:
    process: subprocess.Popen[bytes]
    log: Path
    name: str
    #: Set when the test killed or stopped it: its exit is expected.
    ended: bool = False

    @property
    def pid(self) -> int:
        return self.process.pid

    def children(self) -> list[int]:
        return children_of(self.pid)

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> list[int]:
        """SIGKILL the main process; return the pool processes it had, once they are gone.

        Celery's pool processes ask the kernel for SIGKILL when their parent dies; one that
        outlives it all the same is killed here, so nothing of this worker survives.
        """
        children = self.children()
        self.ended = True
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)
        deadline = time.monotonic() + 10
        while not all(gone(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in children:
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)
        return children

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


# --- PostgreSQL ------------------------------------------------------------------------------


def backend(pid: int) -> dict[str, Any] | None:
    """The ``pg_stat_activity`` row of backend *pid*, or None once it has gone."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT state, wait_event_type, wait_event, datname FROM pg_stat_activity "
            "WHERE pid = %s",
            [pid],
        )
        row = cursor.fetchone()
    if row is None:
        return None
    return dict(zip(("state", "wait_event_type", "wait_event", "datname"), row, strict=True))


def lock_waiters() -> list[int]:
    """Backends of the test database waiting for a lock (a claim blocked by another's)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pid FROM pg_stat_activity "
            "WHERE datname = current_database() AND wait_event_type = 'Lock' "
            "AND pid <> pg_backend_pid()"
        )
        return [int(row[0]) for row in cursor.fetchall()]


def idle_backends() -> list[int]:
    """Backends of the test database, other than the test's own, idle between transactions."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pid FROM pg_stat_activity "
            "WHERE datname = current_database() AND state = 'idle' AND pid <> pg_backend_pid()"
        )
        return [int(row[0]) for row in cursor.fetchall()]


def terminate_backend(pid: int) -> bool:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_terminate_backend(%s)", [pid])
        row = cursor.fetchone()
    return bool(row and row[0])


def postgres_version() -> str:
    with connection.cursor() as cursor:
        cursor.execute("SHOW server_version")
        row = cursor.fetchone()
    return str(row[0]).split()[0] if row else "?"


class DatabaseOutage:
    """The test database made unreachable, then reachable again, from a connection of its own.

    :meth:`begin` runs ``ALTER DATABASE <test db> ALLOW_CONNECTIONS false`` and terminates every
    backend of the test database but those in *keep* (the test's own connection, by default):
    whoever connects then is refused, whoever was connected has lost the connection, as when the
    server goes away. :meth:`end` allows connections again; it is safe to call twice, and
    ``Scenario.close`` calls it, so a failed scenario never leaves the database closed.
    """

    def __init__(self, keep: Iterable[int] | None = None) -> None:
        s = connection.settings_dict
        self.name = str(s["NAME"])
        self.params = {
            "host": s.get("HOST") or "127.0.0.1",
            "port": int(s.get("PORT") or 5432),
            "user": s.get("USER") or "postgres",
            "password": s.get("PASSWORD") or None,
            # The maintenance database: its connection survives the test database's outage.
            "dbname": "postgres",
            "autocommit": True,
        }
        self.keep = set(keep) if keep is not None else {own_backend_pid()}
        self.active = False
        self.terminated = 0

    def _execute(self, sql: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
        with psycopg.connect(**self.params) as conn:  # type: ignore[arg-type]
            cursor = conn.execute(sql, params)
            return cursor.fetchall() if cursor.description else []

    def backends(self) -> list[int]:
        """Backends of the test database other than the kept ones."""
        rows = self._execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            [self.name],
        )
        return [int(pid) for (pid,) in rows if int(pid) not in self.keep]

    def terminate(self) -> int:
        """Terminate every backend of the test database but the kept ones; how many."""
        rows = self._execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid() AND NOT pid = ANY(%s)",
            [self.name, sorted(self.keep)],
        )
        count = sum(1 for (ok,) in rows if ok)
        self.terminated += count
        return count

    def begin(self) -> int:
        self.active = True
        self._execute(f'ALTER DATABASE "{self.name}" ALLOW_CONNECTIONS false')
        return self.terminate()

    def end(self) -> None:
        if self.active:
            self._execute(f'ALTER DATABASE "{self.name}" ALLOW_CONNECTIONS true')
            self.active = False


def own_backend_pid() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        row = cursor.fetchone()
    assert row is not None
    return int(row[0])


# --- The test process as a producer ---------------------------------------------------------


@contextmanager
def producing_to(url: str, connect_timeout: float = 1) -> Iterator[None]:
    """Point the test process's Celery app at the broker *url* while the block runs.

    The outbox publishes with the process's own Celery app after each commit; it read its
    broker from the settings at import. Only the connection changes: a publish made in the block
    is addressed as the settings say, so this serves to watch a publish fail with that broker
    down, not to deliver to a scenario's queue (``Scenario.manage`` does that).
    """
    from celery import current_app

    def reset() -> None:
        if current_app._pool is not None:
            current_app._pool.force_close_all()
            current_app._pool = None
        current_app.amqp._producer_pool = None

    # The transport follows the scheme of *url*: the embedded default's has a scheme of its
    # own (embedded://), so no setting names a transport that would win over it.
    keys = ("broker_write_url", "broker_transport_options", "broker_connection_timeout")
    saved = {key: current_app.conf.get(key) for key in keys}
    reset()
    current_app.conf.update(
        broker_write_url=url,
        broker_transport_options={},
        broker_connection_timeout=connect_timeout,
    )
    try:
        yield
    finally:
        reset()
        current_app.conf.update(saved)


@dataclass
class Process:
    """A service process of a scenario (the outbox relay, the web server), logged to a file."""

    process: subprocess.Popen[bytes]
    log: Path
    name: str
    #: Set once the test stopped it: its exit is expected.
    ended: bool = False

    def alive(self) -> bool:
        return self.process.poll() is None

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        self.ended = True
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.terminate()
                try:
                    self.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(timeout=10)


def free_tcp_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def web_command(port: int) -> list[str]:
    """The web server as scripts/run.sh starts it on PostgreSQL (gunicorn, gthread workers).

    ``WEB_WORKERS`` x ``WEB_THREADS`` (2 x 4 by default, as there) also bound its pooled
    database connections (project/settings.py).
    """
    return [
        str(Path(sys.executable).parent / "gunicorn"),
        "project.wsgi:application",
        "--bind",
        f"127.0.0.1:{port}",
        "--workers",
        os.environ.get("WEB_WORKERS", "2"),
        "--threads",
        os.environ.get("WEB_THREADS", "4"),
        "--worker-class",
        "gthread",
        "--timeout",
        "30",
        "--graceful-timeout",
        "30",
        "--access-logfile",
        "-",
    ]


#: The settings module of a process that needs a variant (tests/faults/settings.py).
FAULTS_SETTINGS = {"DJANGO_SETTINGS_MODULE": "tests.faults.settings"}

#: The relay's reconciler: how long after its publish a message whose event shows no outcome
#: is published again (seconds; the project's default is an hour), and how often it checks.
RECONCILE_AFTER = float(os.environ.get("FAULTS_RECONCILE_AFTER", "45"))
RECONCILE_EVERY = 5.0


# --- The scenario ----------------------------------------------------------------------------


@dataclass
class Scenario:
    number: str
    title: str
    broker: Broker
    directory: Path
    report: Report
    nodeid: str
    ledger: Ledger = field(default_factory=Ledger)
    workers: list[Worker] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.queue = f"faults-{self.number}-{uuid.uuid4().hex[:12]}"
        self.faults = self.directory / "faults"
        for sub in ("plan", "release", "paused", "fired"):
            (self.faults / sub).mkdir(parents=True, exist_ok=True)
        self.started = time.monotonic()
        self._stack = ExitStack()
        self._count = 0
        self.processes: list[Process] = []
        self.outages: list[DatabaseOutage] = []
        #: Figures a scenario measured, shown under the report's table.
        self.notes: list[str] = []

    # Workers

    def worker(
        self,
        *,
        concurrency: int = 2,
        visibility_timeout: int | None = None,
        env: dict[str, str] | None = None,
        armed_to_die: bool = False,
    ) -> Worker:
        """Start a real worker on the scenario's queue, with the fault hooks loaded.

        *armed_to_die*: a fault armed to kill the worker may fire before it is ready; its exit
        is then expected (``ended``), not a failure of its start.
        """
        self._count += 1
        name = f"w{self._count}"
        extra_env = {"FAULTS_DIR": str(self.faults), **(env or {})}
        if visibility_timeout is not None:
            extra_env["CELERY_VISIBILITY_TIMEOUT"] = str(visibility_timeout)
        log = self.directory / f"worker-{name}.log"
        process = self._stack.enter_context(
            celery_worker(
                self.broker.url,
                concurrency=concurrency,
                queues=self.queue,
                log=log,
                extra_env=extra_env,
                include=INCLUDE,
                hostname=f"{self.queue}-{name}",
                may_exit=armed_to_die,
            )
        )
        worker = Worker(process, log, name, ended=armed_to_die)
        self.workers.append(worker)
        return worker

    def stop_workers(self) -> None:
        """Stop every worker (a warm shutdown: running tasks finish) and reap it."""
        for worker in self.workers:
            worker.ended = True
        self._stack.close()
        self._stack = ExitStack()

    def check_workers(self) -> None:
        """Fail at once if a worker, the relay or the web server exited on its own."""
        for worker in self.workers:
            if not worker.ended and not worker.alive():
                pytest.fail(
                    f"worker {worker.name} exited on its own ({worker.process.returncode}):\n"
                    f"{worker.tail()}",
                    pytrace=False,
                )
        for process in self.processes:
            if not process.ended and not process.alive():
                pytest.fail(
                    f"{process.name} exited on its own ({process.process.returncode}):\n"
                    f"{process.tail()}",
                    pytrace=False,
                )

    def pool_processes(self) -> list[int]:
        return [pid for w in self.workers if not w.ended for pid in w.children()]

    # Publishing

    def send(self, task: str, event: dict[str, Any], *, task_id: str | None = None) -> str:
        return self.send_all([(task, event, task_id)])[0]

    def send_all(
        self, messages: Iterable[tuple[str, dict[str, Any], str | None]], **options: Any
    ) -> list[str]:
        """Publish each (task name, event, task id or None), recording it in the ledger.

        *options* go to ``apply_async`` (``time_limit=2``, for one).
        """
        ids = []
        queue = work_queue(self.queue)
        with self.broker.connection() as conn:
            for task, event, task_id in messages:
                task_id = task_id or str(uuid.uuid4())
                TASKS[task].apply_async(
                    args=[event], queue=queue, connection=conn, task_id=task_id, **options
                )
                self.ledger.record(task, event, task_id)
                ids.append(task_id)
        return ids

    def send_raw(self, body: bytes, headers: dict[str, Any], content_type: str) -> None:
        """Publish a message as it is, bypassing Celery's serialiser (a poison message).

        Not recorded in the ledger: it carries no event the ledger could expect.
        """
        queue = work_queue(self.queue)
        with self.broker.connection() as conn:
            conn.Producer().publish(
                body,
                exchange=queue.exchange,
                routing_key=queue.routing_key,
                declare=[queue],
                headers=headers,
                content_type=content_type,
                content_encoding="utf-8",
                delivery_mode=2,
            )

    def send_http(self, client: Any, bodies: Iterable[Any]) -> list[str]:
        """POST each body (an event, or a list of them) to ``/api/events/`` through *client*.

        Every POST must be accepted (202). The ledger records each message the view stored in
        the outbox, with the task id it will be published under.
        """
        ids = []
        for body in bodies:
            last = OutboxMessage.objects.order_by("-pk").values_list("pk", flat=True).first()
            response = client.post("/api/events/", body, format="json")
            assert response.status_code == 202, (response.status_code, response.content)
            ids.extend(self.record_outbox(after=last or 0))
        return ids

    def record_outbox(self, *, after: int) -> list[str]:
        """Record in the ledger the outbox messages stored after primary key *after*."""
        ids = []
        for message in OutboxMessage.objects.filter(pk__gt=after).order_by("pk"):
            self.ledger.record(message.task_name, message.args[0], str(message.task_id))
            ids.append(str(message.task_id))
        return ids

    def process_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The environment of a process of the scenario: its database, broker and queue."""
        return {
            **os.environ,
            "DATABASE_URL": database_url(),
            "CELERY_BROKER_URL": self.broker.url,
            "CELERY_QUEUE": self.queue,
            "CELERY_SKIP_CHECKS": "1",
            "FAULTS_DIR": str(self.faults),
            **(extra or {}),
        }

    def manage(
        self, *args: str, timeout: float = 120, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run ``manage.py`` with the scenario's database, broker and queue, as an operator."""
        return subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=ROOT,
            env=self.process_env(env),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def spawn(self, name: str, command: list[str], env: dict[str, str] | None = None) -> Process:
        """Start a long-running process of the scenario; :meth:`close` stops it."""
        log = self.directory / f"{name}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(
                command, cwd=ROOT, env=self.process_env(env), stdout=out, stderr=subprocess.STDOUT
            )
        process = Process(popen, log, name)
        self.processes.append(process)
        return process

    def relay(
        self,
        env: dict[str, str] | None = None,
        interval: float = 0.5,
        reconcile_after: float = RECONCILE_AFTER,
    ) -> Process:
        """``manage.py relay_outbox --forever``, as scripts/run.sh runs it next to the service.

        It reconciles every :data:`RECONCILE_EVERY` seconds with a horizon of *reconcile_after*
        seconds: a message a broker lost is published again within the scenario.
        """
        relay = self.spawn(
            f"relay-{len(self.processes)}",
            [
                sys.executable,
                "manage.py",
                "relay_outbox",
                "--forever",
                "--interval",
                str(interval),
                "--reconcile-every",
                str(RECONCILE_EVERY),
            ],
            {**FAULTS_SETTINGS, "FAULTS_RECONCILE_AFTER": str(reconcile_after), **(env or {})},
        )
        self.wait(
            lambda: not relay.alive() or b"relaying the outbox" in relay.log.read_bytes(),
            60,
            "the outbox relay to start",
        )
        assert relay.alive(), f"the relay exited:\n{relay.tail()}"
        return relay

    def web(self, env: dict[str, str] | None = None) -> str:
        """The production web server on the test database; its base URL once it answers."""
        port = free_tcp_port()
        server = self.spawn(f"web-{len(self.processes)}", web_command(port), env)
        url = f"http://127.0.0.1:{port}"

        def answers() -> bool:
            assert server.alive(), f"the web server exited:\n{server.tail()}"
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    return True
            except OSError:
                return False

        self.wait(answers, 60, f"the web server to listen on {url}")
        return url

    def database_outage(self, keep: Iterable[int] | None = None) -> DatabaseOutage:
        outage = DatabaseOutage(keep)
        self.outages.append(outage)
        return outage

    # Faults

    def _fault(self, sub: str, event_id: str, point: str) -> Path:
        return self.faults / sub / f"{event_id}@{point}"

    def arm(self, event_id: str, point: str, action: str = "pause") -> None:
        """Arm a fault for the first delivery of *event_id* to reach *point*."""
        assert point in (
            "popped",
            "handler",
            "before-commit",
            "after-commit",
            "before-publish",
        ), point
        assert action in ("pause", "kill"), action
        assert point not in ("popped", "before-publish") or action == "kill", (
            f"a fault at {point} can only kill"
        )
        self._fault("plan", event_id, point).write_text(action)

    def paused(self, event_id: str, point: str, timeout: float = 60) -> dict[str, Any]:
        """Wait until a delivery of *event_id* is paused at *point*; what it wrote."""
        path = self._fault("paused", event_id, point)
        self.wait(path.exists, timeout, f"a delivery of {event_id} to pause at {point}")
        state: dict[str, Any] = json.loads(path.read_text())
        return state

    def release(self, event_id: str, point: str) -> None:
        self._fault("release", event_id, point).write_text("go")

    def fail(self, event_id: str) -> None:
        """Make every delivery of *event_id* fail in its handler, until :meth:`fix`."""
        (self.faults / "fail").mkdir(exist_ok=True)
        (self.faults / "fail" / event_id).write_text("fail")

    def fix(self, event_id: str) -> None:
        (self.faults / "fail" / event_id).unlink()

    def mark(self, kind: str, event_id: str) -> None:
        """``raise-on-duplicate`` or ``slow`` for *event_id*, on every delivery (see hooks)."""
        assert kind in ("raise-on-duplicate", "slow"), kind
        (self.faults / kind).mkdir(exist_ok=True)
        (self.faults / kind / event_id).write_text(kind)

    # Observation

    def journal(self) -> list[tuple[str, str, str, int, str]]:
        """``(kind, consumer or task, event id, pid, detail)`` per line the hooks wrote."""
        path = self.faults / "journal.log"
        if not path.exists():
            return []
        entries = []
        for line in path.read_text().splitlines():
            parts = line.split(" ", 4)
            if len(parts) >= 4:
                detail = parts[4] if len(parts) == 5 else ""
                entries.append((parts[0], parts[1], parts[2], int(parts[3]), detail))
        return entries

    def count(self, kind: str, event_id: str | None = None) -> int:
        return sum(1 for k, _, e, _, _ in self.journal() if k == kind and event_id in (None, e))

    def republished(self) -> tuple[int, int, int]:
        """(outbox messages the reconciler published again, republishes in all, those of them
        the broker had lost).

        A lost message reached no worker before its copy: its task id was received once. A
        late one (queued behind a backlog, restored after a visibility timeout) was received
        as itself and as the copy.
        """
        from django.db.models import Sum

        rows = OutboxMessage.objects.filter(republished__gt=0)
        received = Counter(detail for kind, _, _, _, detail in self.journal() if kind == "received")
        lost = sum(
            1 for task_id in rows.values_list("task_id", flat=True) if received[str(task_id)] <= 1
        )
        return rows.count(), int(rows.aggregate(n=Sum("republished"))["n"] or 0), lost

    def logged(self, text: str) -> int:
        """Lines of the workers' logs that contain *text*."""
        return sum(
            text in line
            for worker in self.workers
            for line in worker.log.read_text(errors="replace").splitlines()
        )

    def diagnostics(self) -> str:
        try:
            state: Any = self.broker.queue_state(self.queue)
        except Exception as exc:
            state = f"unavailable ({exc})"
        kinds = Counter(k for k, *_ in self.journal())
        logs = "\n".join(f"--- worker {w.name} ---\n{w.tail()}" for w in self.workers[-4:])
        logs += "".join(f"\n--- {p.name} ---\n{p.tail()}" for p in self.processes[-3:])
        return (
            f"\nqueue {self.queue}: {state}\ninbox records: {ProcessedEvent.objects.count()} "
            f"of {len(self.ledger.expected_effects())} expected\njournal: {dict(kinds)}\n{logs}"
        )

    def wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        """Poll *predicate*; fail with *what* and the diagnostics after *timeout* seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_workers()
            if predicate():
                return
            time.sleep(0.1)
        pytest.fail(
            f"timed out after {timeout:.0f}s waiting for {what}{self.diagnostics()}",
            pytrace=False,
        )

    def wait_applied(self, count: int | None = None, timeout: float = 120) -> None:
        """Wait until *count* inbox records (all the ledger expects, by default) exist."""
        want = len(self.ledger.expected_effects()) if count is None else count
        self.wait(lambda: ProcessedEvent.objects.count() >= want, timeout, f"{want} inbox records")

    def drain(self, timeout: float = 120, until: Callable[[], bool] | None = None) -> None:
        """Wait until every expected effect exists and the broker holds nothing for the queue.

        Both must hold twice in a row, so a message between a reject and its redelivery, or
        between a retry's publish and its original's ack, is not mistaken for the end. *until*
        replaces the first condition for a scenario whose end is not one inbox record per event.
        """
        want = len(self.ledger.expected_effects())
        streak = [0]

        def settled() -> bool:
            done = (ProcessedEvent.objects.count() >= want) if until is None else until()
            done = done and self.broker.queue_state(self.queue).empty
            streak[0] = streak[0] + 1 if done else 0
            return streak[0] >= 2

        self.wait(settled, timeout, "every effect, and an empty queue")

    # The end

    def verify(self) -> Inspection:
        """Stop the workers, then check the broker and every invariant; publish the numbers."""
        self.stop_workers()
        problems = []
        state = self.broker.queue_state(self.queue)
        # RabbitMQ drops a stopped worker's consumer a moment after its connection closes.
        deadline = time.monotonic() + 10
        while state.consumers and time.monotonic() < deadline:
            time.sleep(0.5)
            state = self.broker.queue_state(self.queue)
        if not state.empty or state.consumers:
            problems.append(f"the broker still holds for {self.queue}: {state}")
        if isinstance(self.broker, RabbitMQ):
            messages, consumers_left = self.broker.declared_counts(self.queue)
            if messages or consumers_left:
                problems.append(
                    f"queue.declare(passive): {messages} messages, {consumers_left} consumers"
                )
        result = inspect(
            self.ledger, broker_dead=state.dead if isinstance(self.broker, RabbitMQ) else None
        )
        problems.extend(result.problems)
        journal = self.journal()
        unsafe = [entry for entry in journal if entry[0] == "unsafe"]
        if unsafe:
            problems.append(
                f"{len(unsafe)} claims were not their connection's one transaction, "
                f"e.g. {unsafe[:3]}"
            )
        self.report.rows.append(
            Row(
                number=self.number,
                title=self.title,
                broker=self.broker.kind,
                nodeid=self.nodeid,
                sent=len(self.ledger.sent),
                deliveries=sum(1 for k, *_ in journal if k == "received"),
                discarded=sum(1 for k, *_ in journal if k in ("discarded", "kept")),
                effects=result.effects,
                dead_letters=result.dead_letters,
                failed_outbox=result.failed_outbox,
                lost=result.lost,
                doubled=result.doubled,
                seconds=time.monotonic() - self.started,
                notes=list(self.notes),
            )
        )
        assert not problems, "\n".join(problems) + self.diagnostics()
        return result

    def close(self) -> None:
        """Stop what is still running, make sure the database and the broker are up, delete the
        scenario's queues."""
        for outage in self.outages:
            outage.end()
        self.stop_workers()
        for process in self.processes:
            process.stop()
        self.broker.ensure_running()
        self.broker.delete_queues(self.queue)
