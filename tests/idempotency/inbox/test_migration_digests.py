"""Migration 0008: the inbox's fingerprints move from hex text to raw bytes, values kept."""

from __future__ import annotations

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

from idempotency.models import ProcessedEvent

BEFORE = [("idempotency", "0007_exact_collation_on_mysql")]
AFTER = [("idempotency", "0008_fingerprints_as_bytes")]
TABLE = ProcessedEvent._meta.db_table
STORED = "ab" * 32
MISMATCHED = "0123456789abcdef" * 4


def _migrate(targets: list[tuple[str, str]]) -> None:
    executor = MigrationExecutor(connection)
    executor.loader.build_graph()
    executor.migrate(targets)


def _raw(column: str) -> list[object]:
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT {column} FROM {TABLE} ORDER BY event_id")
        return [row[0] for row in cursor.fetchall()]


@pytest.mark.django_db(transaction=True)
def test_fingerprints_survive_the_migration_both_ways() -> None:
    _migrate(BEFORE)
    try:
        with connection.cursor() as cursor:
            for event_id, fingerprint, mismatch in [
                ("e-1", STORED, MISMATCHED),
                ("e-2", STORED, ""),
                ("e-3", "", ""),
            ]:
                cursor.execute(
                    f"INSERT INTO {TABLE} (consumer, event_id, processed_at, outcome, reason, "
                    "fingerprint, mismatch_fingerprint, duplicate_count) "
                    "VALUES ('billing', %s, CURRENT_TIMESTAMP, 'processed', '', %s, %s, 0)",
                    [event_id, fingerprint, mismatch],
                )
        _migrate(AFTER)
        # Stored as raw bytes: 32 of them, or none.
        assert [bytes(v) for v in _raw("fingerprint")] == [bytes.fromhex(STORED)] * 2 + [b""]
        records = {r.event_id: r for r in ProcessedEvent.objects.all()}
        assert records["e-1"].fingerprint == STORED
        assert records["e-1"].mismatch_fingerprint == MISMATCHED
        assert records["e-2"].mismatch_fingerprint == ""
        assert records["e-3"].fingerprint == ""
        assert set(ProcessedEvent.objects.mismatched().values_list("event_id", flat=True)) == {
            "e-1"
        }
        assert ProcessedEvent.objects.filter(fingerprint=STORED).count() == 2

        _migrate(BEFORE)
        assert [str(v) for v in _raw("fingerprint")] == [STORED, STORED, ""]
        assert [str(v) for v in _raw("mismatch_fingerprint")] == [MISMATCHED, "", ""]
    finally:
        _migrate([("idempotency", _latest())])


def _latest() -> str:
    executor = MigrationExecutor(connection)
    leaves = [name for app, name in executor.loader.graph.leaf_nodes() if app == "idempotency"]
    return leaves[0]
