"""Two workers claiming the same event at once, on real parallel PostgreSQL or MariaDB/MySQL
connections.

The first claimant holds its transaction open; the second must block on the unique index (seen
in ``pg_stat_activity`` or InnoDB's ``innodb_trx``, not guessed with a sleep), then discard if
the first commits, or process the event if the first rolls back.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.db import DEFAULT_DB_ALIAS, OperationalError, connection, connections
from django.test import override_settings

from idempotency.inbox import claiming, idempotent, statements
from idempotency.models import ProcessedEvent
from idempotency.transient import is_transient
from tests.services import (
    in_thread,
    lock_waiters,
    require_row_locks,
    usable_claim_statements,
    wait_for,
)

pytestmark = [pytest.mark.services, pytest.mark.django_db(transaction=True)]

TIMEOUT = 20


class Rollback(Exception):
    pass


@pytest.fixture(params=sorted(usable_claim_statements()))
def statement(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    require_row_locks()
    chosen = statements.STATEMENTS[request.param]
    monkeypatch.setattr(claiming, "claim_statement", lambda using: chosen)
    return str(request.param)


@pytest.fixture
def race() -> Iterator[Callable[[bool], dict[str, Any]]]:
    threads: list[threading.Thread] = []

    def run(first_commits: bool) -> dict[str, Any]:
        claimed, release = threading.Event(), threading.Event()
        outcome: dict[str, Any] = {"first_ran": 0, "second_ran": 0}
        errors: list[BaseException] = []

        def first() -> None:
            try:
                with idempotent("race", "e-1") as claim:
                    assert not claim.duplicate
                    outcome["first_ran"] += 1
                    claimed.set()
                    assert release.wait(TIMEOUT), "never released"
                    if not first_commits:
                        raise Rollback
            except Rollback:
                pass

        def second() -> None:
            with idempotent("race", "e-1") as claim:
                outcome["second_duplicate"] = claim.duplicate
                if not claim.duplicate:
                    outcome["second_ran"] += 1

        threads.append(in_thread(first, errors))
        assert claimed.wait(TIMEOUT), f"the first claim did not happen: {errors}"
        threads.append(in_thread(second, errors))
        wait_for(lambda: lock_waiters() >= 1, TIMEOUT, "the second claim to block on the lock")
        assert threads[-1].is_alive(), "the second claim did not wait for the first"
        release.set()
        for thread in threads:
            thread.join(TIMEOUT)
            assert not thread.is_alive(), "a claimant hung"
        assert not errors, errors
        return outcome

    yield run
    for thread in threads:
        thread.join(TIMEOUT)


@pytest.mark.parametrize("attempt", range(5))
def test_the_second_claimant_waits_then_discards(
    statement: str, race: Callable[[bool], dict[str, Any]], attempt: int
) -> None:
    outcome = race(True)
    assert outcome == {"first_ran": 1, "second_ran": 0, "second_duplicate": True}
    assert ProcessedEvent.objects.count() == 1


@pytest.mark.parametrize("attempt", range(5))
def test_the_second_claimant_processes_when_the_first_rolls_back(
    statement: str, race: Callable[[bool], dict[str, Any]], attempt: int
) -> None:
    outcome = race(False)
    assert outcome == {"first_ran": 1, "second_ran": 1, "second_duplicate": False}
    assert ProcessedEvent.objects.count() == 1


# --- REPEATABLE READ and SERIALIZABLE --------------------------------------------------------


@pytest.fixture(params=["REPEATABLE_READ", "SERIALIZABLE"])
def isolation(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every new connection to the test database at a stricter isolation level."""
    require_row_locks()
    level: Any
    if connection.vendor == "mysql":
        level = str(request.param).lower().replace("_", " ")
    else:
        from psycopg import IsolationLevel

        level = IsolationLevel[request.param]
    options = connections.settings[DEFAULT_DB_ALIAS].setdefault("OPTIONS", {})
    previous = options.get("isolation_level", _UNSET)
    options["isolation_level"] = level
    connection.close()
    yield str(request.param)
    if previous is _UNSET:
        del options["isolation_level"]
    else:
        options["isolation_level"] = previous
    connection.close()


_UNSET = object()


def current_isolation() -> str:
    """The session's isolation level, spelt "repeatable read"."""
    with connections[DEFAULT_DB_ALIAS].cursor() as cursor:
        if connection.vendor == "mysql":
            # MariaDB 10.11 knows only tx_isolation; MySQL 8 only transaction_isolation.
            name = "tx_isolation" if connection.mysql_is_mariadb else "transaction_isolation"
            cursor.execute(f"SELECT @@session.{name}")
        else:
            cursor.execute("SHOW transaction_isolation")
        return str(cursor.fetchone()[0]).lower().replace("-", " ")


def serialization_failure(error: BaseException) -> bool:
    return isinstance(error, OperationalError) and is_transient(error)


def wait_out(first: threading.Thread, release: threading.Event) -> None:
    wait_for(lambda: lock_waiters() >= 1, TIMEOUT, "the second claim to block on the lock")
    release.set()
    first.join(TIMEOUT)
    assert not first.is_alive(), "the first claimant hung"


def test_concurrent_first_deliveries_at_strict_isolation(statement: str, isolation: str) -> None:
    claimed, release = threading.Event(), threading.Event()
    outcome: dict[str, Any] = {}
    errors: list[BaseException] = []

    def first() -> None:
        with idempotent("race", "e-1") as claim:
            assert not claim.duplicate
            outcome["isolation"] = current_isolation()
            claimed.set()
            assert release.wait(TIMEOUT), "never released"

    def second() -> None:
        try:
            with idempotent("race", "e-1") as claim:
                outcome["second"] = "duplicate" if claim.duplicate else "ran"
        except OperationalError as exc:
            outcome["second"] = exc
        # The connection is usable: a retry, as the task layer makes, sees the duplicate.
        assert not connections[DEFAULT_DB_ALIAS].in_atomic_block
        with idempotent("race", "e-1") as retry:
            outcome["retry_duplicate"] = retry.duplicate

    one = in_thread(first, errors)
    assert claimed.wait(TIMEOUT), f"the first claim did not happen: {errors}"
    two = in_thread(second, errors)
    wait_out(one, release)
    two.join(TIMEOUT)
    assert not two.is_alive(), "the second claimant hung"
    assert not errors, errors
    if statement == "insert_on_duplicate":
        # InnoDB: the duplicate's exclusive lock and the locking read see the committed row.
        assert outcome["second"] == "duplicate", outcome
    elif connection.vendor == "mysql":
        # get_or_create's plain read may see its snapshot (REPEATABLE READ) or lock and wait
        # (SERIALIZABLE): a serialization failure or a duplicate, never a second run.
        assert outcome["second"] == "duplicate" or serialization_failure(outcome["second"])
    else:
        # The second's snapshot predates the first's commit, so it cannot see the row it
        # conflicts with: a serialization failure.
        assert serialization_failure(outcome["second"]), outcome
    assert outcome["retry_duplicate"] is True
    assert outcome["isolation"] == isolation.lower().replace("_", " ")
    assert ProcessedEvent.objects.count() == 1


def test_concurrent_counted_duplicates_at_strict_isolation(statement: str, isolation: str) -> None:
    with override_settings(IDEMPOTENCY={"RECORD_DUPLICATES": True}):
        with idempotent("race", "e-1"):
            pass
        counted, release = threading.Event(), threading.Event()
        outcome: dict[str, Any] = {}
        errors: list[BaseException] = []

        def first() -> None:
            with idempotent("race", "e-1") as claim:
                assert claim.duplicate
                counted.set()  # its UPDATE holds the row until this transaction ends
                assert release.wait(TIMEOUT), "never released"

        def second() -> None:
            try:
                with idempotent("race", "e-1") as claim:
                    outcome["second"] = "duplicate" if claim.duplicate else "ran"
            except OperationalError as exc:
                outcome["second"] = exc
            assert not connections[DEFAULT_DB_ALIAS].in_atomic_block
            with idempotent("race", "e-1") as retry:
                outcome["retry_duplicate"] = retry.duplicate

        one = in_thread(first, errors)
        assert counted.wait(TIMEOUT), f"the first duplicate was not counted: {errors}"
        two = in_thread(second, errors)
        wait_out(one, release)
        two.join(TIMEOUT)
        assert not two.is_alive(), "the second claimant hung"
    assert not errors, errors
    if connection.vendor == "mysql":
        # InnoDB's UPDATE reads the latest committed row, so the second counts after the
        # first; get_or_create's plain read may still fail on its snapshot.
        assert outcome["second"] == "duplicate" or serialization_failure(outcome["second"])
        if statement == "insert_on_duplicate":
            assert outcome["second"] == "duplicate", outcome
    else:
        # The second's UPDATE met a row changed after its snapshot: a serialization failure.
        assert serialization_failure(outcome["second"]), outcome
    assert outcome["retry_duplicate"] is True
    record = ProcessedEvent.objects.get()
    # The first, the second if it committed, and the retry of the second.
    assert record.duplicate_count == 2 + (outcome["second"] == "duplicate")
