"""A primary/replica database router over real PostgreSQL, for the code that must write to the
router's write alias and never to ``Model.objects.db`` (the read alias).

``primary_replica`` adds a ``replica`` alias pointing at the test database through a connection
of its own whose transactions are read-only (``default_transaction_read_only=on``), and installs
a router that reads from ``replica`` and writes to ``default``. It behaves like a hot standby:

- a write, or ``SELECT ... FOR UPDATE``, sent to ``replica`` fails (``cannot execute ... in a
  read-only transaction``), as it does on a standby;
- ``replica`` sees only what ``default`` committed, so the test is transactional (a plain
  ``django_db`` test keeps its writes in a transaction the replica cannot see, which is the
  truth of replicas too);
- ``transaction.atomic()`` and ``on_commit`` without ``using`` are on ``default``; code that
  takes its alias from the read side gets ``replica``, whose ``on_commit`` runs at once
  (nothing is open there), so "published before the commit" shows up as it does in production.

The alias is added to the live ``settings.DATABASES`` (the dict the connection handler reads)
rather than with ``override_settings(DATABASES=...)``, which Django warns against and which the
connection handler would not see. pytest-django's test database creation is not involved: the
replica is a second connection to the database it already made (a ``TEST: {"MIRROR":
"default"}`` alias, so no test flushes it), without a change to the project's settings. Tests
that do not use the fixture are unaffected: no router, and the alias is not among their
databases.

Use it from any test module (the fixtures are registered in ``tests/conftest.py``)::

    from tests.replica import Replica, uses_replica

    @pytest.mark.services
    @uses_replica
    def test_something(primary_replica: Replica) -> None:
        ...
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from django.db import DEFAULT_DB_ALIAS, connections
from django.test import override_settings

from tests.routers import REPLICA
from tests.services import require_postgres


@dataclass(frozen=True)
class Replica:
    primary: str
    replica: str


def replica_settings(primary: dict[str, Any]) -> dict[str, Any]:
    """The settings of a read-only connection to the database of *primary*'s settings."""
    settings = copy.deepcopy(primary)
    options = dict(settings.get("OPTIONS") or {})
    # psycopg passes "options" to the server as command-line options of the session.
    options["options"] = f"{options.get('options', '')} -c default_transaction_read_only=on".strip()
    settings["OPTIONS"] = options
    settings["CONN_MAX_AGE"] = 0
    settings["TEST"] = {**settings.get("TEST", {}), "MIRROR": DEFAULT_DB_ALIAS}
    return settings


#: Mark a test that uses ``primary_replica``: the replica is one of the test's databases.
uses_replica = pytest.mark.django_db(transaction=True, databases=[DEFAULT_DB_ALIAS, REPLICA])


@pytest.fixture(scope="session")
def replica_alias(django_db_setup: None, django_db_blocker: Any) -> Iterator[str]:
    """The ``replica`` alias in ``settings.DATABASES``, from the first test that needs it on.

    Session-scoped so that it exists before pytest-django builds the test's test case, whose
    ``databases`` (from ``uses_replica``) must name it; a mirror, so no test flushes it.
    """
    with django_db_blocker.unblock():
        require_postgres()
    databases = connections.settings
    if REPLICA in databases:
        pytest.fail(f"settings.DATABASES already has a {REPLICA!r} alias", pytrace=False)
    databases[REPLICA] = replica_settings(connections[DEFAULT_DB_ALIAS].settings_dict)
    try:
        yield REPLICA
    finally:
        for conn in connections.all(initialized_only=True):
            if conn.alias == REPLICA:
                conn.close()
        with contextlib.suppress(AttributeError):  # not opened on this thread
            del connections[REPLICA]
        del databases[REPLICA]


@pytest.fixture
def primary_replica(replica_alias: str, transactional_db: None) -> Iterator[Replica]:
    """The router, for the duration of the test (mark the test with ``uses_replica``)."""
    with override_settings(DATABASE_ROUTERS=["tests.routers.PrimaryReplicaRouter"]):
        # Prove the setup is faithful before any test relies on it.
        with connections[replica_alias].cursor() as cursor:
            cursor.execute("SHOW transaction_read_only")
            assert cursor.fetchone()[0] == "on", "the replica connection accepts writes"
        yield Replica(primary=DEFAULT_DB_ALIAS, replica=replica_alias)
    connections[replica_alias].close()
