"""A real outage of the test database: it refuses connections and its sessions are ended."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from django.db import connection, connections
from psycopg import sql


def _admin() -> psycopg.Connection:
    """A connection to the maintenance database, which the outage leaves alone."""
    s = connection.settings_dict
    return psycopg.connect(
        host=s.get("HOST") or "127.0.0.1",
        port=s.get("PORT") or 5432,
        user=s.get("USER") or "postgres",
        password=s.get("PASSWORD") or None,
        dbname="postgres",
        autocommit=True,
    )


def backends(name: str | None = None) -> int:
    """Client sessions connected to the test database (or *name*), as PostgreSQL counts them."""
    with _admin() as admin:
        row = admin.execute(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = %s AND backend_type = 'client backend'",
            [name or connection.settings_dict["NAME"]],
        ).fetchone()
        return int(row[0]) if row else 0


class Outage:
    """Start with :meth:`begin`, end with :meth:`end` (or after *seconds*, on a timer)."""

    def __init__(self) -> None:
        self.name = connection.settings_dict["NAME"]
        self._admin = _admin()
        self._lock = threading.Lock()
        self.active = False

    def begin(self, seconds: float | None = None) -> None:
        with self._lock:
            self._admin.execute(
                sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(
                    sql.Identifier(self.name)
                )
            )
            self._admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                [self.name],
            )
            self.active = True
        if seconds is not None:
            timer = threading.Timer(seconds, self.end)
            timer.daemon = True
            timer.start()

    def end(self) -> None:
        with self._lock:
            if not self.active:
                return
            self._admin.execute(
                sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(
                    sql.Identifier(self.name)
                )
            )
            self.active = False

    def close(self) -> None:
        self.end()
        self._admin.close()


@contextmanager
def outage_control() -> Iterator[Outage]:
    """An :class:`Outage` that is always over on exit; this thread's sessions reconnect after."""
    outage = Outage()
    try:
        yield outage
    finally:
        outage.close()
        # Sessions ended by the outage are broken: the next query opens a new one.
        connections.close_all()
