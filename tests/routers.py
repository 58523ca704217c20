"""The primary/replica router of the tests (tests/replica.py) and of the fault suite's
processes (``FAULTS_REPLICA=1``): no pytest here, worker processes import it."""

from __future__ import annotations

from typing import Any

from django.db import DEFAULT_DB_ALIAS

REPLICA = "replica"


class PrimaryReplicaRouter:
    """Every read from the read-only ``replica``, every write (and migration) to ``default``.

    Strict on purpose: code that takes a write's, a lock's or a transaction's alias from the
    read side (``Model.objects.db``) meets a read-only transaction and fails, as it would on a
    standby.
    """

    def db_for_read(self, model: type[Any], **hints: Any) -> str:
        return REPLICA

    def db_for_write(self, model: type[Any], **hints: Any) -> str:
        return DEFAULT_DB_ALIAS

    def allow_relation(self, obj1: Any, obj2: Any, **hints: Any) -> bool:
        return True

    def allow_migrate(self, db: str, app_label: str, **hints: Any) -> bool:
        return db == DEFAULT_DB_ALIAS
