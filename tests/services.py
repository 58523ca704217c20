"""Reaching the real services: PostgreSQL, RabbitMQ, Redis, and a real `celery worker`."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from django.db import connection, connections

ROOT = Path(__file__).resolve().parent.parent

AMQP_URL = os.environ.get("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
BROKERS = {"rabbitmq": AMQP_URL, "redis": REDIS_URL}
DEFAULT_PORTS = {"amqp": 5672, "redis": 6379, "postgres": 5432, "postgresql": 5432}


def required() -> bool:
    return os.environ.get("REQUIRE_SERVICES") == "1"


def unavailable(reason: str) -> None:
    """Skip the test, or fail it when the run requires the services."""
    if required():
        pytest.fail(f"REQUIRE_SERVICES=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def reachable(url: str) -> bool:
    parts = urlsplit(url)
    port = parts.port or DEFAULT_PORTS.get(parts.scheme, 0)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", port), timeout=2):
            return True
    except OSError:
        return False


def require_postgres() -> None:
    if connection.vendor != "postgresql":
        unavailable(
            f"the tests run on {connection.vendor}; set DATABASE_URL=postgres://... for this test"
        )


#: The dialect each claim statement is written in (get_or_create runs everywhere).
CLAIM_STATEMENT_VENDORS = {
    "insert_select_when_duplicate": {"postgresql"},
    "insert_select": {"postgresql"},
    "insert_returning": {"postgresql", "sqlite"},
    "insert_on_duplicate": {"mysql"},
}


def usable_claim_statements() -> list[str]:
    """The claim statements that run on the test database."""
    from idempotency.inbox.statements import STATEMENTS, supports_insert_select

    names = [
        name
        for name in STATEMENTS
        if connection.vendor in CLAIM_STATEMENT_VENDORS.get(name, {connection.vendor})
    ]
    if not supports_insert_select(connection):
        # Two statements in one execute: psycopg 3 only.
        for name in ("insert_select", "insert_select_when_duplicate"):
            if name in names:
                names.remove(name)
    return names


def require_broker(url: str) -> None:
    if not reachable(url):
        unavailable(f"the broker at {url} is unreachable")


def database_url() -> str:
    """A URL of the test database, for processes started by the test."""
    s = connection.settings_dict
    user = s.get("USER") or ""
    password = f":{s['PASSWORD']}" if s.get("PASSWORD") else ""
    auth = f"{user}{password}@" if user else ""
    return f"postgres://{auth}{s.get('HOST') or '127.0.0.1'}:{s.get('PORT') or 5432}/{s['NAME']}"


def wait_for(
    predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.1
) -> None:
    """Poll until *predicate* holds; fail with *what* after *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}", pytrace=False)


@contextmanager
def celery_worker(
    broker_url: str,
    *,
    concurrency: int = 2,
    queues: str = "celery",
    log: Path,
    extra_env: dict[str, str] | None = None,
    include: Sequence[str] = (),
    extra_args: Sequence[str] = (),
    hostname: str | None = None,
    ready_timeout: float = 60,
    may_exit: bool = False,
) -> Iterator[subprocess.Popen[bytes]]:
    """A real `celery worker` process on the test database, stopped (and reaped) on exit.

    *include* names extra modules the worker imports (``--include``), such as test-only tasks
    or fault hooks; *extra_args* are appended to the command line. A worker that is already
    dead on exit (a test killed it) is only reaped. With *may_exit*, a worker that has exited by
    the time its start is checked is handed over all the same: one armed to kill itself can pop
    its doomed message, and die, within moments of logging ``ready.``.
    """
    env = {
        **os.environ,
        "DATABASE_URL": database_url(),
        "CELERY_BROKER_URL": broker_url,
        "CELERY_QUEUE": queues,
        "CELERY_SKIP_CHECKS": "1",
        **(extra_env or {}),
    }
    command = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "project",
        "worker",
        "--loglevel=INFO",
        f"--concurrency={concurrency}",
        "--pool=prefork",
        "-Q",
        queues,
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
        f"--hostname={hostname or f'test-{os.getpid()}-{time.monotonic_ns()}'}@%h",
    ]
    if include:
        command.append(f"--include={','.join(include)}")
    command.extend(extra_args)
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(
            lambda: process.poll() is not None or b" ready." in log.read_bytes(),
            ready_timeout,
            f"the celery worker to start (log: {log})",
        )
        if process.poll() is not None and not may_exit:
            pytest.fail(f"the celery worker exited:\n{log.read_text()[-3000:]}", pytrace=False)
        yield process
    finally:
        stop_process(process)


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM (a warm shutdown), then SIGKILL if it is still running after 30 s."""
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


def in_thread(target: Callable[[], None], errors: list[BaseException]) -> threading.Thread:
    """Run *target* on a thread of its own (so its own database connection), collecting errors."""

    def run() -> None:
        try:
            target()
        except BaseException as exc:
            errors.append(exc)
        finally:
            connections.close_all()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def require_row_locks() -> None:
    """PostgreSQL or MariaDB/MySQL: a concurrent claim waits on a row lock (SQLite: the file)."""
    if connection.vendor not in ("postgresql", "mysql"):
        unavailable(
            f"the tests run on {connection.vendor}; set DATABASE_URL=postgres://... (or "
            "mysql://...) for this test"
        )


def lock_waiters() -> int:
    """Connections to the test database waiting for a lock, as PostgreSQL or InnoDB sees them."""
    with connection.cursor() as cursor:
        if connection.vendor == "mysql":
            cursor.execute(
                "SELECT count(*) FROM information_schema.innodb_trx t "
                "JOIN information_schema.processlist p ON p.id = t.trx_mysql_thread_id "
                "WHERE t.trx_state = 'LOCK WAIT' AND p.db = DATABASE()"
            )
            return int(cursor.fetchone()[0])
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        return int(cursor.fetchone()[0])


@contextmanager
def run_sh(env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``scripts/run.sh`` (what ``make run`` starts) in a process group of its own, logged to
    *log*; on exit the whole group (the worker, the relay, the server) is stopped."""
    with log.open("wb") as out:
        process = subprocess.Popen(
            ["bash", "scripts/run.sh"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield process
    finally:
        stop_group(process)


def stop_group(process: subprocess.Popen[bytes]) -> None:
    """Stop a process group as its leader's own shutdown would: SIGTERM to the leader alone,
    then to whatever of the group is left once it exited, then SIGKILL to the group, 60 s in
    all. A TERM sent to the whole group at once also reaches a Celery worker's pool children,
    and a child killed while it holds the pool's queue lock leaves the worker's main process
    waiting for that lock for good. A group that already exited (and why) is the caller's to
    report."""
    deadline = time.monotonic() + 60
    with contextlib.suppress(ProcessLookupError):
        os.kill(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=max(deadline - time.monotonic(), 1))
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break  # the whole group is gone
        while time.monotonic() < deadline and group_alive(process):
            time.sleep(0.1)
        deadline = time.monotonic() + 10
    process.wait(timeout=10)


def group_alive(process: subprocess.Popen[bytes]) -> bool:
    process.poll()  # a leader not reaped would keep its group alive
    try:
        os.killpg(process.pid, 0)
    except ProcessLookupError:
        return False
    return True
