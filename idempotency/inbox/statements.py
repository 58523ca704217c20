"""The claim statement, the fastest correct one for each database backend.

* PostgreSQL with psycopg 3 (client-side binding, Django's default): the statement follows each
  consumer's recent duplicate rate. While duplicates are rare (the usual case), only
  ``INSERT ... ON CONFLICT DO NOTHING RETURNING id`` is sent, and a duplicate reads the
  existing row in a second round trip. While they are frequent (a backlog redelivered), one
  round trip carries ``INSERT ...; SELECT ...``: the SELECT is a new statement, so it sees the
  row just inserted, or the one a concurrent claim committed while the INSERT waited, and a
  first delivery pays for a select it does not need. A first delivery costs no savepoint; a
  duplicate writes nothing.
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
from functools import lru_cache, partial
from typing import Any

from django.db import IntegrityError, OperationalError, connections, models
from django.db.backends.base.base import BaseDatabaseWrapper

from .models import Outcome, ProcessedEvent
from .rows import StoredRecord, read_processed_at, row_fields

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

#: The insert's constants, written into the statement rather than sent as parameters: the
#: same for every claim, so no per-claim preparation (``get_db_prep_save``) or quoting.
_INSERT_LITERALS = {
    "outcome": f"'{Outcome.PROCESSED.value}'",
    "reason": "''",
    "mismatch_fingerprint": "{empty_bytes}",
    "duplicate_count": "0",
}

#: An empty byte string, the stored form of "no fingerprint" (``DigestField``), per vendor:
#: PostgreSQL reads X'' as a bit string.
_EMPTY_BYTES = {"postgresql": "''::bytea"}

#: What a claim's *defaults* may set: everything else in a new record is a constant.
_DEFAULT_KEYS = frozenset({"fingerprint", "payload"})

#: Builds the claimed record when it is first needed.
RecordLoader = Callable[[], ProcessedEvent]
LazyClaim = Callable[[str, str, str, Mapping[str, Any]], tuple[RecordLoader, bool]]


class ClaimStatement:
    """A claim statement: ``statement(using, consumer, event_id, defaults)`` returns
    ``(record, created)``; :attr:`lazily` returns ``(load, created)`` instead, ``load()``
    building the record: a first delivery whose record nobody reads builds no model instance.

    *defaults* sets the initial ``fingerprint`` and ``payload`` of a new record.
    """

    def __init__(self, lazily: LazyClaim) -> None:
        self.lazily = lazily
        self.__name__ = lazily.__name__
        self.__doc__ = lazily.__doc__

    def __call__(
        self, using: str, consumer: str, event_id: str, defaults: Mapping[str, Any]
    ) -> tuple[ProcessedEvent, bool]:
        load, created = self.lazily(using, consumer, event_id, defaults)
        return load(), created

    def __repr__(self) -> str:
        return f"<ClaimStatement {self.__name__}>"


def _field(name: str) -> models.Field:
    field = ProcessedEvent._meta.get_field(name)
    assert isinstance(field, models.Field)
    return field


def _quoted(name: str) -> str:
    return f'"{_field(name).column}"'


def _placeholders(vendor: str) -> str:
    empty = _EMPTY_BYTES.get(vendor, "X''")
    return ", ".join(
        _INSERT_LITERALS.get(name, "%s").format(empty_bytes=empty) for name in _INSERT_FIELDS
    )


@lru_cache(maxsize=4)
def _sql(vendor: str) -> dict[str, str]:
    # Quoting follows the SQL standard, which both vendors accept.
    table = f'"{ProcessedEvent._meta.db_table}"'
    columns = ", ".join(_quoted(name) for name in _INSERT_FIELDS)
    every = ", ".join(f'"{f.column}"' for f in row_fields())
    insert = (
        f"INSERT INTO {table} ({columns}) VALUES ({_placeholders(vendor)}) "
        f"ON CONFLICT ({_quoted('event_id')}, {_quoted('consumer')}) DO NOTHING"
    )
    select = (
        f"SELECT {every} FROM {table} "
        f"WHERE {_quoted('consumer')} = %s AND {_quoted('event_id')} = %s"
    )
    returning = f"{insert} RETURNING {_quoted('id')}, {_quoted('processed_at')}"
    return {"insert": returning, "select": select, "insert_select": f"{returning}; {select}"}


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


def _params(using: str, consumer: str, event_id: str, defaults: Mapping[str, Any]) -> list[Any]:
    """The insert's parameters: only what differs between claims (see ``_INSERT_LITERALS``)."""
    if not defaults.keys() <= _DEFAULT_KEYS:
        raise TypeError(
            f"a claim's defaults set only {sorted(_DEFAULT_KEYS)}, not {sorted(defaults)}"
        )
    payload = defaults.get("payload")
    if payload is not None:  # the only value that needs the field's preparation (JSON)
        payload = _field("payload").get_db_prep_save(payload, connections[using])
    # The fingerprint's stored form, its raw bytes (DigestField), as bytes: every driver sends
    # those as binary.
    return [consumer, event_id, bytes.fromhex(defaults.get("fingerprint", "")), payload]


def _new_record(
    using: str,
    pk: int,
    processed_at: Any,
    consumer: str,
    event_id: str,
    defaults: Mapping[str, Any],
) -> ProcessedEvent:
    """The record an insert just made, from what it was given and what it returned."""
    processed_at = read_processed_at(using, processed_at)
    record = ProcessedEvent(
        pk=pk, processed_at=processed_at, **_values(consumer, event_id, defaults)
    )
    record._state.adding = False
    record._state.db = using
    return record


def _select(using: str, consumer: str, event_id: str) -> Sequence[Any] | None:
    connection = connections[using]
    with connection.cursor() as cursor:
        cursor.execute(_sql(connection.vendor)["select"], [consumer, event_id])
        row: Sequence[Any] | None = cursor.fetchone()
    return row


@ClaimStatement
def insert_select(
    using: str, consumer: str, event_id: str, defaults: Mapping[str, Any]
) -> tuple[RecordLoader, bool]:
    """PostgreSQL with psycopg 3: the insert and the select in one round trip."""
    connection = connections[using]
    sql = _sql(connection.vendor)
    params = _params(using, consumer, event_id, defaults)
    with connection.cursor() as cursor:
        cursor.execute(sql["insert_select"], [*params, consumer, event_id])
        inserted = cursor.fetchone()
        if inserted is not None:
            # The select's row is the one just inserted: everything in it is known already.
            # Its result arrived with the insert's; leaving it unread costs nothing.
            return partial(
                _new_record, using, inserted[0], inserted[1], consumer, event_id, defaults
            ), True
        cursor.nextset()
        row = cursor.fetchone()
    if row is None:
        # The conflicting row was purged between the two statements: claim afresh.
        return insert_returning.lazily(using, consumer, event_id, defaults)
    return StoredRecord(using, row), False


@ClaimStatement
def insert_returning(
    using: str, consumer: str, event_id: str, defaults: Mapping[str, Any]
) -> tuple[RecordLoader, bool]:
    """SQLite, PostgreSQL: insert, and select only when the insert did nothing."""
    connection = connections[using]
    with connection.cursor() as cursor:
        cursor.execute(
            _sql(connection.vendor)["insert"], _params(using, consumer, event_id, defaults)
        )
        inserted = cursor.fetchone()
    if inserted is None:
        row = _select(using, consumer, event_id)
        if row is None:
            # The conflicting row was purged between the two statements: claim afresh.
            return insert_returning.lazily(using, consumer, event_id, defaults)
        return StoredRecord(using, row), False
    return partial(_new_record, using, inserted[0], inserted[1], consumer, event_id, defaults), True


#: Each claim moves its consumer's estimated duplicate rate this share of the way to 1 (a
#: duplicate) or 0 (a first delivery): a change of traffic is followed within a dozen claims.
_RATE_STEP = 1 / 8
#: The estimated duplicate rate above which the select rides along with the insert. Measured
#: (bench/statements.py): the select costs a first delivery about 150 us, a round trip of its
#: own costs a duplicate about 140 us more, so one round trip for both pays from about half the
#: claims being duplicates; a third serves a redelivered backlog in one round trip sooner.
_SELECT_WITH_INSERT_ABOVE = 1 / 3
#: Estimates kept at most: consumer names are usually a fixed set (task names), but nothing
#: stops a project from building them per tenant; past this many the estimates start over.
_MAX_ESTIMATES = 1024
_duplicate_rates: dict[tuple[str, str], float] = {}


def duplicate_rate(using: str, consumer: str) -> float:
    """This process's estimate of the share of duplicates among *consumer*'s recent claims."""
    return _duplicate_rates.get((using, consumer), 0.0)


def forget_duplicate_rates() -> None:
    """Start every estimate afresh (at 0: duplicates rare), as a new process does."""
    _duplicate_rates.clear()


@ClaimStatement
def insert_select_when_duplicate(
    using: str, consumer: str, event_id: str, defaults: Mapping[str, Any]
) -> tuple[RecordLoader, bool]:
    """PostgreSQL with psycopg 3: :func:`insert_returning` while the consumer's duplicates are
    rare, :func:`insert_select` (one round trip for both statements) while they are frequent.
    """
    key = (using, consumer)
    rate = _duplicate_rates.get(key, 0.0)
    chosen = insert_select if rate > _SELECT_WITH_INSERT_ABOVE else insert_returning
    load, created = chosen.lazily(using, consumer, event_id, defaults)
    if key not in _duplicate_rates and len(_duplicate_rates) >= _MAX_ESTIMATES:
        _duplicate_rates.clear()
    # Races between threads lose an update at worst: the estimate only picks a statement.
    _duplicate_rates[key] = rate + ((0.0 if created else 1.0) - rate) * _RATE_STEP
    return load, created


@lru_cache(maxsize=1)
def _mysql_sql() -> dict[str, str]:
    # Backticks: without ANSI_QUOTES, MariaDB and MySQL read a double-quoted name as a string.
    def quote(name: str) -> str:
        return f"`{name}`"

    table = quote(ProcessedEvent._meta.db_table)
    columns = ", ".join(quote(_field(name).column) for name in _INSERT_FIELDS)
    every = ", ".join(quote(f.column) for f in row_fields())
    pk = quote(_field("id").column)
    return {
        # A no-op update: the duplicate row is locked and left as it is.
        "insert": f"INSERT INTO {table} ({columns}) VALUES ({_placeholders('mysql')}) "
        f"ON DUPLICATE KEY UPDATE {pk} = {pk}",
        "select": f"SELECT {every} FROM {table} "
        f"WHERE {quote(_field('consumer').column)} = %s "
        f"AND {quote(_field('event_id').column)} = %s FOR UPDATE",
    }


def _new_deferred_record(
    using: str, pk: int, consumer: str, event_id: str, defaults: Mapping[str, Any]
) -> ProcessedEvent:
    record = ProcessedEvent(pk=pk, **_values(consumer, event_id, defaults))
    record._state.adding = False
    record._state.db = using
    # processed_at is the database's: deferred (absent from __dict__), one SELECT if read.
    del record.__dict__["processed_at"]
    return record


@ClaimStatement
def insert_on_duplicate(
    using: str, consumer: str, event_id: str, defaults: Mapping[str, Any]
) -> tuple[RecordLoader, bool]:
    """MariaDB/MySQL: insert or lock the duplicate; select (locking) only for a duplicate."""
    connection = connections[using]
    sql = _mysql_sql()
    with connection.cursor() as cursor:
        cursor.execute(sql["insert"], _params(using, consumer, event_id, defaults))
        new_id = cursor.lastrowid
        if not new_id:
            cursor.execute(sql["select"], [consumer, event_id])
            row = cursor.fetchone()
    if new_id:
        return partial(_new_deferred_record, using, new_id, consumer, event_id, defaults), True
    if row is None:
        # The conflicting row was purged between the two statements: claim afresh.
        return insert_on_duplicate.lazily(using, consumer, event_id, defaults)
    return StoredRecord(using, row), False


def _loaded(record: ProcessedEvent) -> ProcessedEvent:
    return record


@ClaimStatement
def get_or_create(
    using: str, consumer: str, event_id: str, defaults: Mapping[str, Any]
) -> tuple[RecordLoader, bool]:
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
    return partial(_loaded, record), created


#: Every claim statement, for the tests that run each one on each database.
STATEMENTS: dict[str, ClaimStatement] = {
    "insert_select_when_duplicate": insert_select_when_duplicate,
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
        return insert_select_when_duplicate
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
