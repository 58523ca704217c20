"""The claim through PgBouncer in transaction pooling mode, in front of the test database.

A deployment of thousands of worker processes cannot give each its own PostgreSQL connection
(docs/scaling.md); a pooler in transaction mode hands a server connection to a client for one
transaction at a time. The claim keeps no session state between transactions (no prepared
statement, no ``SET`` outside ``SET LOCAL``, no advisory lock), so it must work unchanged: these
tests start a private ``pgbouncer`` on a free loopback port and claim through it, on a second
database alias, while the direct connection watches.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from django.db import connection, connections, transaction
from django.db.utils import ConnectionDoesNotExist, load_backend

from idempotency.conf import app_settings
from idempotency.inbox import idempotent, statements
from idempotency.models import ProcessedEvent
from tests.services import in_thread, lock_waiters, require_postgres, unavailable, wait_for

pytestmark = [pytest.mark.services, pytest.mark.django_db(transaction=True)]

ALIAS = "pgbouncer"
TIMEOUT = 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pgbouncer_binary() -> str:
    found = shutil.which("pgbouncer") or (
        "/usr/sbin/pgbouncer" if os.access("/usr/sbin/pgbouncer", os.X_OK) else None
    )
    if found is None:
        unavailable("pgbouncer is not installed (apt-get install pgbouncer)")
    assert found is not None
    return found


def pooler_stats(port: int, command: str) -> list[dict[str, Any]]:
    """A ``SHOW`` of the pgbouncer's admin console, as rows of column names to values."""
    s = connection.settings_dict
    with psycopg.connect(
        host="127.0.0.1",
        port=port,
        dbname="pgbouncer",
        user=s.get("USER") or "postgres",
        autocommit=True,
        prepare_threshold=None,
    ) as admin:
        cursor = admin.execute(f"SHOW {command}")
        names = [c.name for c in cursor.description or []]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def reachable(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture
def pgbouncer() -> Iterator[int]:
    """A pgbouncer in transaction mode in front of the test database; its port."""
    require_postgres()
    binary = pgbouncer_binary()
    s = connection.settings_dict
    user = s.get("USER") or "postgres"
    port = free_port()
    # pgbouncer refuses to run as root: as root it is told to switch to the postgres user,
    # which must be able to read its files.
    directory = Path(tempfile.mkdtemp(prefix="pgbouncer-"))
    directory.chmod(0o755)
    (directory / "users.txt").write_text(f'"{user}" "{s.get("PASSWORD") or ""}"\n')
    (directory / "pgbouncer.ini").write_text(
        "\n".join(
            [
                "[databases]",
                f"{s['NAME']} = host={s.get('HOST') or '127.0.0.1'} "
                f"port={s.get('PORT') or 5432} dbname={s['NAME']}",
                "[pgbouncer]",
                "listen_addr = 127.0.0.1",
                f"listen_port = {port}",
                "unix_socket_dir =",
                # The pooler's own clients are trusted (loopback only); it logs in to
                # PostgreSQL with the test database's credentials from users.txt.
                "auth_type = trust",
                f"auth_file = {directory / 'users.txt'}",
                "pool_mode = transaction",
                # Fewer server connections than clients in the race below would deadlock it:
                # the blocked claim holds one while the first claimant holds another.
                "default_pool_size = 4",
                "max_client_conn = 20",
                "server_reset_query =",
                f"admin_users = {user}",
                "",
            ]
        )
    )
    for path in directory.iterdir():
        path.chmod(0o644)
    command = [binary, str(directory / "pgbouncer.ini")]
    if os.geteuid() == 0:
        command[1:1] = ["-u", "postgres"]
    log = (directory / "pgbouncer.log").open("wb")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not reachable(port):
            if process.poll() is not None or time.monotonic() > deadline:
                output = (directory / "pgbouncer.log").read_text()
                pytest.fail(f"pgbouncer did not start:\n{output}", pytrace=False)
            time.sleep(0.05)
        yield port
        # The tests' transactions went through the pooler, in transaction mode.
        ours = [r for r in pooler_stats(port, "POOLS") if r["database"] == s["NAME"]]
        assert ours, "no pool for the test database: nothing went through the pgbouncer"
        assert {r["pool_mode"] for r in ours} == {"transaction"}
        (stats,) = [r for r in pooler_stats(port, "STATS") if r["database"] == s["NAME"]]
        assert stats["total_xact_count"] >= 2
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        shutil.rmtree(directory, ignore_errors=True)


#: The settings of the alias through the pgbouncer, while a test runs.
_through: dict[str, Any] = {}


def attach() -> str:
    """The alias through the pgbouncer, for this thread (connections are per thread).

    The connection is set on ``connections`` without a settings entry: the test case forbids
    every configured database it was not told of, and a connection made at run time is not one.
    """
    try:
        connections[ALIAS]
    except ConnectionDoesNotExist:
        backend = load_backend(_through["ENGINE"])
        connections[ALIAS] = backend.DatabaseWrapper(dict(_through), ALIAS)
    return ALIAS


def detach() -> None:
    connections[ALIAS].close()
    del connections[ALIAS]


@pytest.fixture(params=["client-side binding", "server-side binding"])
def through(request: pytest.FixtureRequest, pgbouncer: int) -> Iterator[str]:
    """A database alias for the test database through the pgbouncer."""
    _through.update(
        {
            **connection.settings_dict,
            "HOST": "127.0.0.1",
            "PORT": str(pgbouncer),
            "CONN_MAX_AGE": 0,
            "OPTIONS": {
                **{k: v for k, v in connection.settings_dict["OPTIONS"].items() if k != "pool"},
                # Django's default (client-side binding) composes each statement itself, so
                # the claim's INSERT and SELECT travel in one round trip; server-side binding
                # sends unnamed statements, which a transaction pooler passes through too, in
                # two. Prepared statements stay off (Django's prepare_threshold default).
                "server_side_binding": request.param == "server-side binding",
            },
        }
    )
    try:
        yield attach()
    finally:
        detach()
        _through.clear()


def claim(using: str, event_id: str) -> tuple[bool, int]:
    """Claim *event_id* through *using*: (duplicate, the pgbouncer's server-side pid)."""
    with idempotent("pgbouncer.consumer", event_id, payload={"id": event_id}, using=using) as c:
        with connections[using].cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            (pid,) = cursor.fetchone()
        return c.duplicate, int(pid)


def test_first_time_then_duplicate(through: str) -> None:
    duplicate, _ = claim(through, "e-1")
    assert not duplicate
    duplicate, _ = claim(through, "e-1")
    assert duplicate
    record = ProcessedEvent.objects.get(consumer="pgbouncer.consumer", event_id="e-1")
    # The example project counts duplicates (a write of the duplicate's own, through the pooler).
    assert record.duplicate_count == (1 if app_settings.RECORD_DUPLICATES else 0)
    assert record.fingerprint  # the payload's fingerprint made it through the pooler
    # The statement the claim took: one round trip with client-side binding, two without.
    assert statements.supports_insert_select(connections[through]) is not _server_side(through)


def _server_side(alias: str) -> bool:
    return bool(connections[alias].settings_dict["OPTIONS"].get("server_side_binding"))


def test_a_rollback_releases_the_claim(through: str) -> None:
    class Failed(Exception):
        pass

    with pytest.raises(Failed), idempotent("pgbouncer.consumer", "e-2", using=through) as c:
        assert not c.duplicate
        raise Failed
    assert not ProcessedEvent.objects.filter(event_id="e-2").exists()
    duplicate, _ = claim(through, "e-2")
    assert not duplicate, "the rolled-back claim left nothing behind"
    assert ProcessedEvent.objects.filter(event_id="e-2").count() == 1


@pytest.mark.parametrize("first_commits", [True, False], ids=["commit", "rollback"])
def test_two_claims_of_one_event_at_once(through: str, first_commits: bool) -> None:
    """The second claimant, on another client connection, blocks on the unique index until
    the first transaction ends, then discards (commit) or processes the event (rollback)."""

    class Rollback(Exception):
        pass

    claimed, release = threading.Event(), threading.Event()
    outcome: dict[str, Any] = {}
    errors: list[BaseException] = []

    def first() -> None:
        attach()
        try:
            with transaction.atomic(using=through):
                outcome["first"] = claim(through, "e-race")
                claimed.set()
                release.wait(TIMEOUT)
                if not first_commits:
                    raise Rollback
        except Rollback:
            pass
        finally:
            claimed.set()
            detach()

    def second() -> None:
        attach()
        try:
            outcome["second"] = claim(through, "e-race")
        finally:
            detach()

    waiting = lock_waiters()
    one = in_thread(first, errors)
    assert claimed.wait(TIMEOUT)
    two = in_thread(second, errors)
    wait_for(lambda: lock_waiters() > waiting, TIMEOUT, "the second claim to block")
    assert "second" not in outcome
    release.set()
    one.join(TIMEOUT)
    two.join(TIMEOUT)
    assert not errors, errors
    assert outcome["first"][0] is False
    assert outcome["second"][0] is first_commits
    # Two transactions at once: the pooler gave them two server connections.
    assert outcome["first"][1] != outcome["second"][1]
    assert ProcessedEvent.objects.filter(event_id="e-race").count() == 1
