"""The claim statement, the fastest correct one for each database backend.

* PostgreSQL with psycopg 3 (client-side binding, Django's default): one round trip carrying
  ``INSERT ... ON CONFLICT DO NOTHING RETURNING id; SELECT ...``. The SELECT is a new statement,
  so it sees the row just inserted, or the one a concurrent claim committed while the INSERT
  waited. A first delivery costs no savepoint; a duplicate writes nothing.
* SQLite (3.35+) and other PostgreSQL set-ups: ``INSERT ... ON CONFLICT DO NOTHING RETURNING``,
  then a SELECT only for a duplicate.
* MariaDB and MySQL: ``INSERT ... ON DUPLICATE KEY UPDATE id = id``, the driver's last insert
  id telling a new row (its id) from a duplicate (0: Django's ``CLIENT_FOUND_ROWS`` makes the
  affected-row count 1 either way), then ``SELECT ... FOR UPDATE`` only for a duplicate. The
  duplicate takes an exclusive lock on the existing row where a failed plain ``INSERT`` (and so
  ``get_or_create``) takes a shared one, which deadlocks two waiters of a claim that rolls back
  under InnoDB's REPEATABLE READ; the locking read sees the latest committed row where a
  consistent read would see the transaction's snapshot, taken before a concurrent claim
  committed. ``INSERT IGNORE`` would also turn every other error of the insert (a value too
  long, a NULL) into a warning and a silent duplicate. A new row's ``processed_at`` (the
  database's clock) is left deferred: it is read when first used.
* Any other backend: ``get_or_create``, whose ``IntegrityError`` is caught inside a savepoint so
  the caller's transaction stays usable.

On every path a concurrent claim of the same key blocks on the unique index until the first
transaction ends, then sees its row (a duplicate) or, if it rolled back, inserts its own.
A data-modifying CTE (``WITH ins AS (INSERT ...) SELECT ...``) does the same in one statement,
but PostgreSQL plans it anew each time at about 0.4 ms, more than the round trip it saves.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

from django.db import IntegrityError, OperationalError, connections, models
from django.db.backends.base.base import BaseDatabaseWrapper

from .models import Outcome, ProcessedEvent

#: Columns written by the insert, in order; everything else takes the model's default.
#: ``processed_at`` is left to the column's default, the database's clock (``db_default``).
_INSERT_FIELDS = (
    "consumer",
    "event_id",
    "outcome",
    "reason",
    "fingerprint",
    "mismatch_fingerprint",
    "payload",
    "duplicate_count",
)

#: ``(using, consumer, event_id, defaults) -> (record, created)``; *defaults* sets initial
#: values of a new record (``fingerprint``, ``payload``).
ClaimStatement = Callable[[str, str, str, Mapping[str, Any]], tuple[ProcessedEvent, bool]]


def _field(name: str) -> models.Field:
    field = ProcessedEvent._meta.get_field(name)
    assert isinstance(field, models.Field)
    return field


def _quoted(name: str) -> str:
    return f'"{_field(name).column}"'


@lru_cache(maxsize=1)
def _fields() -> tuple[models.Field, ...]:
    return tuple(ProcessedEvent._meta.concrete_fields)


@lru_cache(maxsize=1)
def _attnames() -> list[str]:
    return [f.attname for f in _fields()]


@lru_cache(maxsize=4)
def _sql(vendor: str) -> dict[str, str]:
    # Quoting follows the SQL standard, which both vendors accept.
    table = f'"{ProcessedEvent._meta.db_table}"'
    columns = ", ".join(_quoted(name) for name in _INSERT_FIELDS)
    placeholders = ", ".join(["%s"] * len(_INSERT_FIELDS))
    every = ", ".join(f'"{f.column}"' for f in _fields())
    insert = (
        f"INSERT INTO {table} ({columns}) VALUES ({placeholders}) "
        f"ON CONFLICT ({_quoted('event_id')}, {_quoted('consumer')}) DO NOTHING"
    )
    select = (
        f"SELECT {every} FROM {table} "
        f"WHERE {_quoted('consumer')} = %s AND {_quoted('event_id')} = %s"
    )
    returning = f"{insert} RETURNING {_quoted('id')}, {_quoted('processed_at')}"
    return {"insert": returning, "select": select, "insert_select": f"{returning}; {select}"}


@lru_cache(maxsize=8)
def _converters(using: str, vendor: str) -> list[tuple[Any, list[Callable[..., Any]]]]:
    """Per column, the expression and the converters Django's compiler would apply."""
    connection = connections[using]
    result = []
    for field in _fields():
        col = field.get_col(ProcessedEvent._meta.db_table)
        converters = [*connection.ops.get_db_converters(col), *col.get_db_converters(connection)]
        result.append((col, converters))
    return result


def _record(using: str, row: Sequence[Any]) -> ProcessedEvent:
    connection = connections[using]
    values = []
    for value, (col, converters) in zip(row, _converters(using, connection.vendor), strict=True):
        for converter in converters:
            value = converter(value, col, connection)
        values.append(value)
    return ProcessedEvent.from_db(using, _attnames(), values)


def _values(consumer: str, event_id: str, defaults: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "consumer": consumer,
        "event_id": event_id,
        "outcome": Outcome.PROCESSED.value,
        "reason": "",
        "fingerprint": "",
        "mismatch_fingerprint": "",
        "payload": None,
        "duplicate_count": 0,
        **defaults,
    }


def _params(using: str, values: dict[str, Any]) -> list[Any]:
    connection = connections[using]
    return [_field(name).get_db_prep_save(values[name], connection) for name in _INSERT_FIELDS]


def _select(using: str, consumer: str, event_id: str) -> ProcessedEvent | None:
    connection = connections[using]
    with connection.cursor() as cursor:
        cursor.execute(_sql(connection.vendor)["select"], [consumer, event_id])
        row = cursor.fetchone()
    return None if row is None else _record(using, row)


def insert_select(
    using: str, consumer: str, event_id: str, defaults: Mapping[str, Any]
) -> tuple[ProcessedEvent, bool]:
    """PostgreSQL with psycopg 3: the insert and the select in one round trip."""
    connection = connections[using]
    sql = _sql(connection.vendor)
    params = _params(using, _values(consumer, event_id, defaults))
    with connection.cursor() as cursor:
        cursor.execute(sql["insert_select"], [*params, consumer, event_id])
        created = cursor.fetchone() is not None
        cursor.nextset()
        row = cursor.fetchone()
    if row is None:
        # The conflicting row was purged between the two statements: claim afresh.
        return insert_returning(using, consumer, event_id, defaults)
    return _record(using, row), created


def insert_returning(
    using: str, consumer: str, event_id: str, defaults: Mapping[str, Any]
) -> tuple[ProcessedEvent, bool]:
    """SQLite: insert, and select only when the insert did nothing."""
    connection = connections[using]
    values = _values(consumer, event_id, defaults)
    with connection.cursor() as cursor:
        cursor.execute(_sql(connection.vendor)["insert"], _params(using, values))
        row = cursor.fetchone()
    if row is None:
        existing = _select(using, consumer, event_id)
        if existing is None:
            # The conflicting row was purged between the two statements: claim afresh.
            return insert_returning(using, consumer, event_id, defaults)
        return existing, False
    record = ProcessedEvent(pk=row[0], processed_at=_processed_at(using, row[1]), **values)
    record._state.adding = False
    record._state.db = using
    return record, True


@lru_cache(maxsize=1)
def _mysql_sql() -> dict[str, str]:
    # Backticks: without ANSI_QUOTES, MariaDB and MySQL read a double-quoted name as a string.
    def quote(name: str) -> str:
        return f"`{name}`"

    table = quote(ProcessedEvent._meta.db_table)
    columns = ", ".join(quote(_field(name).column) for name in _INSERT_FIELDS)
    placeholders = ", ".join(["%s"] * len(_INSERT_FIELDS))
    every = ", ".join(quote(f.column) for f in _fields())
    pk = quote(_field("id").column)
    return {
        # A no-op update: the duplicate row is locked and left as it is.
        "insert": f"INSERT INTO {table} ({columns}) VALUES ({placeholders}) "
        f"ON DUPLICATE KEY UPDATE {pk} = {pk}",
        "select": f"SELECT {every} FROM {table} "
        f"WHERE {quote(_field('consumer').column)} = %s "
        f"AND {quote(_field('event_id').column)} = %s FOR UPDATE",
    }


def insert_on_duplicate(
    using: str, consumer: str, event_id: str, defaults: Mapping[str, Any]
) -> tuple[ProcessedEvent, bool]:
    """MariaDB/MySQL: insert or lock the duplicate; select (locking) only for a duplicate."""
    connection = connections[using]
    sql = _mysql_sql()
    values = _values(consumer, event_id, defaults)
    with connection.cursor() as cursor:
        cursor.execute(sql["insert"], _params(using, values))
        new_id = cursor.lastrowid
        if not new_id:
            cursor.execute(sql["select"], [consumer, event_id])
            row = cursor.fetchone()
    if new_id:
        record = ProcessedEvent(pk=new_id, **values)
        record._state.adding = False
        record._state.db = using
        # processed_at is the database's: deferred (absent from __dict__), one SELECT if read.
        del record.__dict__["processed_at"]
        return record, True
    if row is None:
        # The conflicting row was purged between the two statements: claim afresh.
        return insert_on_duplicate(using, consumer, event_id, defaults)
    return _record(using, row), False


def _processed_at(using: str, value: Any) -> Any:
    """A ``processed_at`` returned by the insert, converted as Django would read it."""
    connection = connections[using]
    col, converters = _converters(using, connection.vendor)[_attnames().index("processed_at")]
    for converter in converters:
        value = converter(value, col, connection)
    return value


def get_or_create(
    using: str, consumer: str, event_id: str, defaults: Mapping[str, Any]
) -> tuple[ProcessedEvent, bool]:
    """Any backend: ``get_or_create``, its insert inside a savepoint."""
    try:
        record, created = ProcessedEvent.objects.using(using).get_or_create(
            consumer=consumer, event_id=event_id, defaults=dict(defaults)
        )
    except IntegrityError as exc:
        # get_or_create re-raises when its second look still misses the row its insert
        # conflicted with: one a concurrent claim committed, invisible to this transaction's
        # snapshot (REPEATABLE READ, SERIALIZABLE). A serialization failure, and transient.
        raise OperationalError(
            f"could not serialize the claim of {consumer} event {event_id!r}: a concurrent "
            "transaction claimed it; retry the transaction"
        ) from exc
    if created and not isinstance(record.processed_at, datetime):
        # A backend that cannot return columns from an insert leaves the database default unread.
        record.refresh_from_db(using=using, fields=["processed_at"])
    return record, created


#: Every claim statement, for the tests that run each one on each database.
STATEMENTS: dict[str, ClaimStatement] = {
    "insert_select": insert_select,
    "insert_returning": insert_returning,
    "insert_on_duplicate": insert_on_duplicate,
    "get_or_create": get_or_create,
}


def supports_insert_select(connection: BaseDatabaseWrapper) -> bool:
    """Two statements in one ``execute`` need psycopg 3 binding parameters client-side."""
    if connection.vendor != "postgresql":
        return False
    driver: Any = getattr(connection, "Database", None)
    is_psycopg3 = getattr(driver, "__name__", "") == "psycopg"
    options = connection.settings_dict.get("OPTIONS", {})
    return is_psycopg3 and not options.get("server_side_binding")


def statement_for(connection: BaseDatabaseWrapper) -> ClaimStatement:
    if supports_insert_select(connection):
        return insert_select
    if connection.vendor in {"postgresql", "sqlite"} and (
        connection.features.can_return_columns_from_insert
    ):
        return insert_returning
    if connection.vendor == "mysql":
        return insert_on_duplicate
    return get_or_create


def claim_statement(using: str) -> ClaimStatement:
    """The claim function for the database *using*."""
    return statement_for(connections[using])
