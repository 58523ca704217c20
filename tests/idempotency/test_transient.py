"""is_transient(): which database errors a delivery waits out instead of failing for good."""

from __future__ import annotations

import sqlite3
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import psycopg
import psycopg.errors
import pytest
from django.db import (
    DatabaseError,
    IntegrityError,
    InterfaceError,
    OperationalError,
    connection,
    connections,
    transaction,
)
from django.db.utils import DatabaseErrorWrapper

from idempotency.models import ProcessedEvent
from idempotency.transient import TRANSIENT_ERRORS, is_transient
from tests.services import in_thread, require_postgres, wait_for


def wrapped(error: BaseException) -> BaseException:
    """*error* as Django raises it from a psycopg connection (a Django class, the cause kept)."""
    wrapper = SimpleNamespace(Database=psycopg, errors_occurred=False)
    with pytest.raises((DatabaseError, InterfaceError)) as info, DatabaseErrorWrapper(wrapper):
        raise error
    assert info.value.__cause__ is error
    return info.value


@pytest.mark.parametrize(
    "sqlstate",
    [
        "40001",
        "40P01",
        "40003",
        "55P03",
        "57P01",
        "57P03",
        "57014",
        "08006",
        "08001",
        "53300",
        "25006",
        "58030",
    ],
)
def test_transient_sqlstates(sqlstate: str) -> None:
    error = psycopg.errors.lookup(sqlstate)("transient")
    assert is_transient(error)
    django_error = wrapped(error)
    assert isinstance(django_error, TRANSIENT_ERRORS)
    assert is_transient(django_error)


@pytest.mark.parametrize(
    ("sqlstate", "django_class"),
    [
        ("23505", IntegrityError),  # unique violation: the event's fault
        ("22P02", DatabaseError),  # invalid text representation (DataError)
        ("42P01", DatabaseError),  # undefined table (ProgrammingError): a deployment bug
        ("54000", OperationalError),  # program limit exceeded: an OperationalError, yet permanent
        ("40002", OperationalError),  # integrity violation found at commit
    ],
)
def test_permanent_sqlstates(sqlstate: str, django_class: type[Exception]) -> None:
    django_error = wrapped(psycopg.errors.lookup(sqlstate)("permanent"))
    assert isinstance(django_error, django_class)
    assert not is_transient(django_error)


def test_an_error_without_a_code_is_judged_by_its_class() -> None:
    # What psycopg raises when the server vanished before answering: no SQLSTATE.
    lost = psycopg.OperationalError("server closed the connection unexpectedly")
    assert is_transient(lost)
    assert is_transient(wrapped(lost))
    assert is_transient(wrapped(psycopg.InterfaceError("the connection is closed")))
    assert is_transient(OperationalError("bare"))
    assert is_transient(InterfaceError("bare"))
    assert not is_transient(IntegrityError("bare"))
    assert not is_transient(DatabaseError("bare"))


def test_other_exceptions() -> None:
    assert is_transient(ConnectionResetError(104, "Connection reset by peer"))
    assert is_transient(ConnectionRefusedError(111, "Connection refused"))
    assert not is_transient(ValueError("bad event"))
    assert not is_transient(KeyError("eventId"))
    assert not is_transient(KeyboardInterrupt())
    assert not is_transient(SystemExit(1))


def test_sqlite_busy_is_transient_and_a_missing_table_is_not(tmp_path: Path) -> None:
    path = tmp_path / "busy.sqlite3"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE t (x int)")
    holder.execute("BEGIN IMMEDIATE")
    other = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        with pytest.raises(sqlite3.OperationalError) as busy:
            other.execute("BEGIN IMMEDIATE")
        with pytest.raises(sqlite3.OperationalError) as missing:
            other.execute("SELECT * FROM nowhere")
    finally:
        holder.close()
        other.close()
    if sys.version_info >= (3, 11):  # the code's attribute is new in 3.11
        assert busy.value.sqlite_errorcode == sqlite3.SQLITE_BUSY
    assert is_transient(busy.value)
    django_busy = OperationalError(*busy.value.args)
    django_busy.__cause__ = busy.value
    assert is_transient(django_busy)
    django_missing = OperationalError(*missing.value.args)
    django_missing.__cause__ = missing.value
    assert not is_transient(django_missing), "no such table fails every attempt alike"


def test_mysql_error_numbers() -> None:
    mysql_error = type("OperationalError", (Exception,), {"__module__": "MySQLdb._exceptions"})
    gone = OperationalError(2006, "MySQL server has gone away")
    gone.__cause__ = mysql_error(2006, "MySQL server has gone away")
    assert is_transient(gone)
    deadlock = OperationalError(1213, "Deadlock found")
    deadlock.__cause__ = mysql_error(1213, "Deadlock found")
    assert is_transient(deadlock)
    unknown_column = OperationalError(1054, "Unknown column 'x'")
    unknown_column.__cause__ = mysql_error(1054, "Unknown column 'x'")
    assert not is_transient(unknown_column)


# --- Real PostgreSQL errors -------------------------------------------------------------------


@pytest.mark.services
@pytest.mark.django_db(transaction=True)
def test_real_lock_timeout_and_unique_violation() -> None:
    require_postgres()
    ProcessedEvent.objects.create(consumer="transient", event_id="e-1")
    locked, release = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def hold() -> None:
        with transaction.atomic():
            ProcessedEvent.objects.select_for_update().get(event_id="e-1")
            locked.set()
            release.wait(20)

    thread = in_thread(hold, errors)
    try:
        assert locked.wait(20), errors
        with pytest.raises(OperationalError) as timeout, transaction.atomic():
            with connection.cursor() as cursor:
                cursor.execute("SET LOCAL lock_timeout = '50ms'")
            ProcessedEvent.objects.select_for_update().get(event_id="e-1")
    finally:
        release.set()
        thread.join(20)
    assert not errors, errors
    assert isinstance(timeout.value.__cause__, psycopg.errors.LockNotAvailable)
    assert is_transient(timeout.value)
    with pytest.raises(IntegrityError) as duplicate, transaction.atomic():
        ProcessedEvent.objects.create(consumer="transient", event_id="e-1")
    assert not is_transient(duplicate.value)


@pytest.mark.services
@pytest.mark.django_db(transaction=True)
def test_real_terminated_connection_is_transient() -> None:
    require_postgres()
    victim = connections.create_connection("default")
    try:
        victim.ensure_connection()
        with victim.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            (pid,) = cursor.fetchone()
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_terminate_backend(%s)", [pid])

        def gone() -> bool:
            with connection.cursor() as cursor:
                cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", [pid])
                return cursor.fetchone()[0] == 0

        wait_for(gone, 10, "the terminated backend to exit")
        with pytest.raises((OperationalError, InterfaceError)) as lost, victim.cursor() as cursor:
            cursor.execute("SELECT 1")
    finally:
        victim.close()
    assert is_transient(lost.value)


@pytest.mark.parametrize(
    ("message", "transient"),
    [
        ("database is locked", True),
        ("database table is locked: idempotency_processedevent", True),
        ("disk I/O error", True),
        ("no such table: nowhere", False),
        ('near "SELEC": syntax error', False),
    ],
)
def test_a_sqlite_error_without_its_code_is_judged_by_its_message(
    message: str, transient: bool
) -> None:
    # What Python 3.10's sqlite3 raises: no sqlite_errorcode attribute.
    error = sqlite3.OperationalError(message)
    assert getattr(error, "sqlite_errorcode", None) is None
    assert is_transient(error) is transient
    wrapped = OperationalError(message)
    wrapped.__cause__ = error
    assert is_transient(wrapped) is transient
