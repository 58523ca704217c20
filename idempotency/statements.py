"""The claim statement, the fastest correct one for each database backend.

PostgreSQL and SQLite (3.35+) run one ``INSERT ... ON CONFLICT DO NOTHING RETURNING``: no
savepoint, no SELECT on the first delivery, and a concurrent claim of the same key blocks on the
unique index until the first transaction ends. Other backends use ``get_or_create``, whose
``IntegrityError`` is caught inside a savepoint so the caller's transaction stays usable.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

from django.db import connections, models
from django.db.backends.base.base import BaseDatabaseWrapper
from django.utils import timezone

from .models import Outcome, ProcessedEvent

#: Columns written by the insert, in order; everything else takes the model's default.
_INSERT_FIELDS = (
    "consumer",
    "event_id",
    "processed_at",
    "outcome",
    "reason",
    "fingerprint",
    "mismatch_fingerprint",
)

#: ``(using, consumer, event_id, fingerprint) -> (record, created)``
ClaimStatement = Callable[[str, str, str, str], tuple[ProcessedEvent, bool]]


def _field(name: str) -> models.Field:
    field = ProcessedEvent._meta.get_field(name)
    assert isinstance(field, models.Field)
    return field


def supports_insert_returning(connection: BaseDatabaseWrapper) -> bool:
    return connection.vendor in {"postgresql", "sqlite"} and bool(
        connection.features.can_return_columns_from_insert
    )


@lru_cache(maxsize=8)
def _insert_sql(vendor: str, table: str) -> str:
    # Quoting follows the SQL standard, which both supported vendors accept.
    meta = ProcessedEvent._meta
    columns = ", ".join(f'"{_field(name).column}"' for name in _INSERT_FIELDS)
    placeholders = ", ".join(["%s"] * len(_INSERT_FIELDS))
    unique = ", ".join(f'"{_field(name).column}"' for name in ("consumer", "event_id"))
    pk = meta.pk.column if meta.pk else "id"
    return (
        f'INSERT INTO "{table}" ({columns}) VALUES ({placeholders}) '
        f'ON CONFLICT ({unique}) DO NOTHING RETURNING "{pk}"'
    )


def insert_returning(
    using: str, consumer: str, event_id: str, fingerprint: str
) -> tuple[ProcessedEvent, bool]:
    connection = connections[using]
    record = ProcessedEvent(
        consumer=consumer,
        event_id=event_id,
        processed_at=timezone.now(),
        outcome=Outcome.PROCESSED,
        fingerprint=fingerprint,
    )
    params = [
        _field(name).get_db_prep_save(getattr(record, name), connection) for name in _INSERT_FIELDS
    ]
    with connection.cursor() as cursor:
        cursor.execute(_insert_sql(connection.vendor, ProcessedEvent._meta.db_table), params)
        row = cursor.fetchone()
    if row is not None:
        record.pk = row[0]
        record._state.adding = False
        record._state.db = using
        return record, True
    return ProcessedEvent.objects.using(using).get(consumer=consumer, event_id=event_id), False


def get_or_create(
    using: str, consumer: str, event_id: str, fingerprint: str
) -> tuple[ProcessedEvent, bool]:
    return ProcessedEvent.objects.using(using).get_or_create(
        consumer=consumer, event_id=event_id, defaults={"fingerprint": fingerprint}
    )


def claim_statement(using: str) -> ClaimStatement:
    """The claim function for the database *using*."""
    if supports_insert_returning(connections[using]):
        return insert_returning
    return get_or_create
