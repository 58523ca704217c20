"""The lazy claim record, the signals it skips, and the payload fingerprints stored as raw
bytes (DigestField, migration 0008): what a caller, a receiver, a model form or an upgrade of an
old inbox may do to them.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
from django.core.exceptions import ValidationError
from django.db import connection, transaction
from django.db.models.signals import post_init
from django.test import override_settings

from idempotency import signals
from idempotency.exceptions import InvalidEvent, PayloadMismatch
from idempotency.fingerprint import sha256_hex
from idempotency.inbox import claim, idempotent
from idempotency.models import ProcessedEvent

pytestmark = pytest.mark.django_db(transaction=True)

DIGEST = sha256_hex(b'{"amount":1}')


# --- Findings -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fingerprint", ["v1:order-42", "abc", "sha256:" + "ab" * 28, "ab" * 33, "g" * 64, 5, None]
)
def test_claim_refuses_a_fingerprint_that_is_not_a_hex_digest(fingerprint: Any) -> None:
    # The column holds a digest's 32 bytes: anything else is refused with the library's error
    # before a statement runs, and the transaction stays usable.
    with transaction.atomic():
        with pytest.raises(InvalidEvent, match="64 hex characters"):
            claim("billing", "e-1", fingerprint=fingerprint)
        _, created = claim("billing", "e-1", fingerprint=DIGEST)
    assert created
    assert ProcessedEvent.objects.get(event_id="e-1").fingerprint == DIGEST


def test_a_lookup_by_a_fingerprint_that_is_not_a_digest_is_refused() -> None:
    with pytest.raises(InvalidEvent):
        list(ProcessedEvent.objects.filter(fingerprint="not a digest"))


def test_a_claimed_record_with_a_fingerprint_passes_full_clean() -> None:
    # The model's value is the 64-character hex form of 32 bytes: full_clean() (a model form
    # over the inbox, a data check, an import) checks that form, not the stored length.
    with idempotent("billing", "e-1", payload={"amount": 1}):
        pass
    record = ProcessedEvent.objects.get(event_id="e-1")
    assert len(record.fingerprint) == 64
    try:
        record.full_clean()
    except ValidationError as exc:
        pytest.fail(f"full_clean() refuses a record the claim wrote: {exc.message_dict}")
    record.fingerprint = "not a digest"
    with pytest.raises(ValidationError) as refused:
        record.full_clean()
    assert list(refused.value.message_dict) == ["fingerprint"]


def test_claim_record_fingerprint_reads_the_same_first_time_and_on_a_duplicate() -> None:
    # An upper-case hex fingerprint is stored as bytes and read back lower-case; the first
    # claim's record, built from what the caller gave, reads lower-case too.
    upper = DIGEST.upper()
    with transaction.atomic():
        first, created = claim("billing", "e-1", fingerprint=upper)
    assert created
    with transaction.atomic():
        again, created = claim("billing", "e-1", fingerprint=upper)
    assert not created
    assert first.fingerprint == again.fingerprint == DIGEST


@override_settings(IDEMPOTENCY={})  # the library's defaults: duplicates not counted
def test_a_duplicate_discarded_builds_no_record_until_it_is_read() -> None:
    built: list[ProcessedEvent] = []

    def count(sender: Any, instance: ProcessedEvent, **kwargs: Any) -> None:
        built.append(instance)

    payload = {"amount": 10}
    with idempotent("billing", "e-1", payload=payload) as first:
        first.result = {"balance": "90.00"}
    post_init.connect(count, sender=ProcessedEvent)
    try:
        with idempotent("billing", "e-1", payload=payload) as again:
            assert again.duplicate
            # The stored result and the fingerprint compared came from the row itself.
            assert again.result == {"balance": "90.00"}
            assert built == []
            record = again.record
            assert record is not None
            assert record.result == {"balance": "90.00"}
            assert record.fingerprint == sha256_hex(b'{"amount":10}')
            assert record.pk == ProcessedEvent.objects.values_list("pk", flat=True).get()
            assert again.record is record
            assert built == [record]
        # A different payload under the same id is still seen, the record built for its note.
        with pytest.raises(PayloadMismatch), idempotent("billing", "e-1", payload={"amount": 11}):
            pass
    finally:
        post_init.disconnect(count, sender=ProcessedEvent)
    assert ProcessedEvent.objects.get().mismatch_fingerprint == sha256_hex(b'{"amount":11}')


# --- What held ------------------------------------------------------------------------------


def test_a_receiver_connected_after_the_first_claims_is_called() -> None:
    # "No dispatch without receivers" must read the receivers at each claim, not cache them.
    with idempotent("billing", "e-0"):
        pass
    with idempotent("billing", "e-0"):
        pass
    seen: list[tuple[str, str]] = []

    def on_processed(sender: Any, record: ProcessedEvent, **kwargs: Any) -> None:
        seen.append(("processed", record.event_id))

    def on_duplicate(sender: Any, record: ProcessedEvent, **kwargs: Any) -> None:
        seen.append(("duplicate", record.event_id))

    signals.event_processed.connect(on_processed)
    signals.duplicate_discarded.connect(on_duplicate)
    try:
        with idempotent("billing", "e-1"):
            pass
        with idempotent("billing", "e-1"):
            pass
    finally:
        signals.event_processed.disconnect(on_processed)
        signals.duplicate_discarded.disconnect(on_duplicate)
    assert seen == [("processed", "e-1"), ("duplicate", "e-1")]


def test_a_raising_receiver_rolls_the_claim_back_and_a_retry_processes_it() -> None:
    def boom(**kwargs: Any) -> None:
        raise RuntimeError("receiver failed")

    signals.event_processed.connect(boom)
    try:
        with pytest.raises(RuntimeError), idempotent("billing", "e-1"):
            pass
    finally:
        signals.event_processed.disconnect(boom)
    assert not connection.in_atomic_block
    assert not ProcessedEvent.objects.exists()
    with idempotent("billing", "e-1") as again:
        assert again.created


def test_the_record_read_after_commit_rollback_or_from_another_thread() -> None:
    with idempotent("billing", "e-1", payload={"amount": 1}) as committed:
        committed.result = {"ok": True}
    stored = ProcessedEvent.objects.get(event_id="e-1")
    record = committed.record
    assert record is not None
    assert (record.pk, record.fingerprint, record.result) == (
        stored.pk,
        stored.fingerprint,
        stored.result,
    )
    assert record.processed_at == stored.processed_at

    with pytest.raises(ZeroDivisionError), idempotent("billing", "e-2") as rolled_back:
        1 / 0  # noqa: B018
    late = rolled_back.record  # built after the rollback: a record that is not stored
    assert late is not None
    assert late.event_id == "e-2"
    assert not ProcessedEvent.objects.filter(event_id="e-2").exists()

    with idempotent("billing", "e-3") as elsewhere:
        pass
    built: list[ProcessedEvent | None] = []
    thread = threading.Thread(target=lambda: built.append(elsewhere.record))
    thread.start()
    thread.join()
    assert built[0] is not None
    assert built[0].processed_at == ProcessedEvent.objects.get(event_id="e-3").processed_at


def test_nested_claims_of_one_id_and_the_inner_one_is_the_duplicate() -> None:
    with idempotent("billing", "e-1") as outer:
        assert outer.created
        with idempotent("billing", "e-1") as inner:
            assert inner.duplicate
            assert inner.record is not None
            assert outer.record is not None
            assert inner.record.pk == outer.record.pk
    assert ProcessedEvent.objects.count() == 1


def test_a_payload_mismatch_against_a_row_written_as_bytes_is_seen() -> None:
    with idempotent("billing", "e-1", payload={"amount": 1}):
        pass
    with idempotent("billing", "e-1", payload={"amount": 2}, on_mismatch="discard") as dup:
        assert dup.duplicate
    record = ProcessedEvent.objects.get(event_id="e-1")
    assert record.fingerprint == DIGEST
    assert record.mismatch_fingerprint == sha256_hex(b'{"amount":2}')
    assert list(ProcessedEvent.objects.mismatched()) == [record]


def _migrate(name: str) -> None:
    from django.db.migrations.executor import MigrationExecutor

    executor = MigrationExecutor(connection)
    executor.loader.build_graph()
    executor.migrate([("idempotency", name)])


def _latest() -> str:
    from django.db.migrations.executor import MigrationExecutor

    leaves = MigrationExecutor(connection).loader.graph.leaf_nodes()
    return next(n for app, n in leaves if app == "idempotency")


def _insert_old_rows(rows: list[tuple[str, str]]) -> None:
    """Rows as 0007's schema holds them: the fingerprints as text."""
    with connection.cursor() as cursor:
        for event_id, fingerprint in rows:
            cursor.execute(
                f"INSERT INTO {ProcessedEvent._meta.db_table} (consumer, event_id, processed_at, "
                "outcome, reason, fingerprint, mismatch_fingerprint, duplicate_count) "
                "VALUES ('billing', %s, CURRENT_TIMESTAMP, 'processed', '', %s, '', 0)",
                [event_id, fingerprint],
            )


@pytest.mark.django_db(transaction=True)
def test_migration_0008_upgrades_an_inbox_with_a_fingerprint_that_is_not_hex() -> None:
    # Before 0008 the column was a CharField(64) that claim(fingerprint=...) filled with any
    # text: such a value becomes the SHA-256 of its bytes, a digest, not a stopped upgrade; a
    # hex digest in capitals is the same digest; an empty one stays empty.
    import hashlib

    latest = _latest()
    _migrate("0007_exact_collation_on_mysql")
    try:
        _insert_old_rows([("e-1", "v1:order-42"), ("e-2", DIGEST.upper()), ("e-3", "")])
        _migrate("0008_fingerprints_as_bytes")
        stored = dict(ProcessedEvent.objects.values_list("event_id", "fingerprint"))
        assert stored == {
            "e-1": hashlib.sha256(b"v1:order-42").hexdigest(),
            "e-2": DIGEST,
            "e-3": "",
        }
        assert ProcessedEvent.objects.filter(fingerprint="").count() == 1
        assert ProcessedEvent.objects.mismatched().count() == 0
    finally:
        with connection.cursor() as cursor:
            cursor.execute(f"DELETE FROM {ProcessedEvent._meta.db_table}")
        _migrate(latest)


@pytest.mark.parametrize("record_duplicates", [False, True])
def test_sixty_four_concurrent_claims_of_one_id_on_postgresql(record_duplicates: bool) -> None:
    # One claimant applies, the 63 others wait on its row and then see a duplicate: the lazy
    # record, built only for them, must still be the committed one.
    if connection.vendor != "postgresql":
        pytest.skip("the concurrency that matters is PostgreSQL's")
    from django.db import connections

    claimants = 64
    barrier = threading.Barrier(claimants)
    outcomes: list[tuple[bool, int | None]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def run() -> None:
        try:
            barrier.wait(timeout=30)
            with idempotent("billing", "same", payload={"amount": 1}) as c:
                if c.created:
                    c.result = {"winner": threading.get_ident()}
                outcome = (c.created, c.record.pk if c.duplicate and c.record else None)
            with lock:
                outcomes.append(outcome)
        except BaseException as exc:  # reported by the assertion below
            with lock:
                errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=run) for _ in range(claimants)]
    with override_settings(IDEMPOTENCY={"RECORD_DUPLICATES": record_duplicates}):
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    assert errors == []
    stored = ProcessedEvent.objects.get(consumer="billing", event_id="same")
    assert sorted(created for created, _ in outcomes) == [False] * 63 + [True]
    assert {pk for created, pk in outcomes if not created} == {stored.pk}
    assert stored.result is not None
    assert stored.fingerprint == DIGEST
    assert stored.duplicate_count == (claimants - 1 if record_duplicates else 0)


def test_dumpdata_and_loaddata_keep_the_fingerprints(tmp_path: Any) -> None:
    from django.core.management import call_command

    with idempotent("billing", "e-1", payload={"amount": 1}):
        pass
    with idempotent("billing", "e-1", payload={"amount": 2}, on_mismatch="discard"):
        pass
    dump = tmp_path / "inbox.json"
    call_command("dumpdata", "idempotency.processedevent", output=str(dump), verbosity=0)
    assert DIGEST in dump.read_text()
    ProcessedEvent.objects.all().delete()
    call_command("loaddata", str(dump), verbosity=0)
    record = ProcessedEvent.objects.get(event_id="e-1")
    assert record.fingerprint == DIGEST
    assert record.mismatch_fingerprint == sha256_hex(b'{"amount":2}')
    assert ProcessedEvent.objects.filter(fingerprint=DIGEST).count() == 1


@pytest.mark.django_db(transaction=True)
def test_migration_0008_finishes_a_conversion_that_stopped_half_way() -> None:
    # MariaDB/MySQL cannot roll DDL back, so Django runs 0008 outside a transaction: the column
    # is altered, then the rows are converted one UPDATE at a time, each committed. A conversion
    # stopped half-way (the process killed during the long row-by-row loop) leaves the column
    # altered, some rows as raw bytes and the migration unrecorded: running migrate again must
    # finish it, not decode the converted rows a second time.
    if connection.features.can_rollback_ddl:
        pytest.skip("a failed migration rolls back whole here")
    table = ProcessedEvent._meta.db_table
    latest = _latest()
    _migrate("0007_exact_collation_on_mysql")
    try:
        _insert_old_rows([("e-1", "ab" * 32), ("e-2", "cd" * 32), ("e-3", "")])
        with connection.cursor() as cursor:
            # What the first run left: the columns altered, e-1's fingerprint converted.
            for column in ("fingerprint", "mismatch_fingerprint"):
                cursor.execute(f"ALTER TABLE {table} MODIFY {column} longblob NOT NULL")
            cursor.execute(
                f"UPDATE {table} SET fingerprint = %s WHERE event_id = 'e-1'",
                [bytes.fromhex("ab" * 32)],
            )
        _migrate("0008_fingerprints_as_bytes")
        stored = dict(ProcessedEvent.objects.values_list("event_id", "fingerprint"))
        assert stored == {"e-1": "ab" * 32, "e-2": "cd" * 32, "e-3": ""}
    finally:
        with connection.cursor() as cursor:
            cursor.execute(f"DELETE FROM {table}")
        _migrate(latest)
