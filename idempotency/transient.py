"""Which database errors say nothing about the event: retry the delivery, never drop it.

A transient error (the database unreachable or restarting, a connection reset, a serialization
failure or deadlock, a lock wait that timed out, a standby that refuses writes during a failover)
would succeed on a later attempt with the same message. Anything else (a constraint the event
violates, bad data, a programming error) fails every attempt alike.

The driver's error code decides where there is one: PostgreSQL's SQLSTATE, SQLite's extended
result code, MySQL's error number. Without one (a connection that dropped before the server
answered) every :class:`~django.db.OperationalError` and :class:`~django.db.InterfaceError` is
transient, which errs on the side of keeping the message.
"""

from __future__ import annotations

import contextlib
import random
import time

from django.db import DatabaseError, InterfaceError, connections

#: The exception classes a transient error is raised as. Every transient error is an instance of
#: one of them, but not every instance is transient (an ``IntegrityError`` is a
#: ``DatabaseError``): catch these, then ask :func:`is_transient`.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (DatabaseError, InterfaceError, ConnectionError)

#: SQLSTATE classes (the first two characters) whose every code is transient.
TRANSIENT_SQLSTATE_CLASSES = frozenset(
    {
        "08",  # connection exception: unreachable, reset, refused, protocol broken
        "53",  # insufficient resources: too many connections, out of memory, disk full
        "57",  # operator intervention: shutdown, restart, crash recovery, query cancelled
    }
)

#: Single SQLSTATEs that are transient.
TRANSIENT_SQLSTATES = frozenset(
    {
        "40001",  # serialization_failure (REPEATABLE READ, SERIALIZABLE)
        "40P01",  # deadlock_detected
        "40003",  # statement_completion_unknown: the connection went mid-commit
        "55P03",  # lock_not_available (lock_timeout, NOWAIT)
        "25006",  # read_only_sql_transaction: writing to a standby during a failover
        "58000",  # system_error
        "58030",  # io_error
    }
)

#: SQLite primary result codes of a database that is busy or briefly unavailable.
_SQLITE_TRANSIENT = frozenset(
    {
        5,  # SQLITE_BUSY: another connection holds the write lock
        6,  # SQLITE_LOCKED
        10,  # SQLITE_IOERR
        13,  # SQLITE_FULL
        14,  # SQLITE_CANTOPEN
        15,  # SQLITE_PROTOCOL
    }
)

#: The messages of those codes, for a driver that gives no code (Python 3.10's sqlite3).
_SQLITE_TRANSIENT_MESSAGES = (
    "database is locked",  # SQLITE_BUSY
    "database table is locked",  # SQLITE_LOCKED
    "disk I/O error",  # SQLITE_IOERR
    "database or disk is full",  # SQLITE_FULL
    "unable to open database file",  # SQLITE_CANTOPEN
    "locking protocol",  # SQLITE_PROTOCOL
)

#: MySQL and MariaDB error numbers of a lost connection, a lock wait or a deadlock.
_MYSQL_TRANSIENT = frozenset(
    {
        1040,  # too many connections
        1053,  # server shutdown in progress
        1205,  # lock wait timeout exceeded
        1213,  # deadlock found
        1927,  # connection killed (MariaDB)
        2002,  # cannot connect through the socket
        2003,  # cannot connect to the server
        2006,  # server has gone away
        2013,  # lost connection during query
        2055,  # lost connection at the system level
        4031,  # disconnected by the server for inactivity
    }
)


def _sqlstate(error: BaseException) -> str | None:
    # psycopg 3 names it sqlstate, psycopg2 pgcode; both may be None (a client-side error).
    for name in ("sqlstate", "pgcode"):
        value = getattr(error, name, None)
        if isinstance(value, str) and value:
            return value
    return None


def _driver_verdict(error: BaseException) -> bool | None:
    """What the driver's own error code says: True, False, or None when it has no code."""
    state = _sqlstate(error)
    if state is not None:
        return state in TRANSIENT_SQLSTATES or state[:2] in TRANSIENT_SQLSTATE_CLASSES
    code = getattr(error, "sqlite_errorcode", None)
    if isinstance(code, int):
        return code & 0xFF in _SQLITE_TRANSIENT
    if type(error).__module__ == "sqlite3" and error.args:
        # Python 3.10's sqlite3 carries no code: its message is the code's sqlite3_errstr().
        return str(error.args[0]).startswith(_SQLITE_TRANSIENT_MESSAGES)
    module = type(error).__module__
    if module.startswith(("MySQLdb", "pymysql", "mysql")) and error.args:
        errno = error.args[0]
        if isinstance(errno, int):
            return errno in _MYSQL_TRANSIENT
    return None


def is_transient(exc: BaseException) -> bool:
    """True when *exc* is an infrastructure error that a later attempt may not meet.

    Django's database errors are judged by the driver error they wrap (``__cause__``); a driver
    error raised as is, by its own code. A built-in :class:`ConnectionError` (reset, refused,
    broken pipe) is transient too.
    """
    if isinstance(exc, ConnectionError):
        return True
    if not isinstance(exc, Exception):
        return False  # KeyboardInterrupt, SystemExit: never a reason to retry in-process
    for error in (exc, exc.__cause__):
        if error is not None:
            verdict = _driver_verdict(error)
            if verdict is not None:
                return verdict
    # PEP 249 names the classes alike in every driver, so an unwrapped driver error counts too.
    return any(cls.__name__ in _DBAPI_TRANSIENT for cls in type(exc).__mro__)


_DBAPI_TRANSIENT = frozenset({"OperationalError", "InterfaceError"})


#: The first in-process pause after a transient error, and the longest; each pause doubles,
#: with jitter, so workers that lost the database together do not come back together.
TRANSIENT_BACKOFF_FIRST = 0.25
TRANSIENT_BACKOFF_MAX = 5.0


class TransientWait:
    """The in-process wait of one delivery: capped exponential backoff with jitter."""

    def __init__(self, window: float) -> None:
        self.deadline = time.monotonic() + window
        self.pauses = 0

    def pause(self) -> bool:
        """Sleep before the next attempt; False when the window is spent (give the message back)."""
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            return False
        delay = min(TRANSIENT_BACKOFF_MAX, TRANSIENT_BACKOFF_FIRST * 2**self.pauses)
        delay = delay / 2 + random.uniform(0, delay / 2)  # jitter, not secrecy
        time.sleep(min(delay, remaining))
        self.pauses += 1
        return True


def drop_connections() -> None:
    """Close the connections a transient error may have broken, so the next attempt reconnects.

    A connection inside an atomic block belongs to a caller (an eager task in a transaction of
    its own): closing it would break that transaction, so it is left alone.
    """
    for connection in connections.all(initialized_only=True):
        if connection.in_atomic_block:
            continue
        # Closing a dead connection may fail; Django forgets it either way.
        with contextlib.suppress(DatabaseError):
            connection.close()
