"""Columns whose values compare byte for byte on every backend, so a unique index on them does.

MariaDB's and MySQL's default collations ignore case and accents (``utf8mb4_general_ci``,
``utf8mb4_0900_ai_ci``), and their ``_bin`` collations still ignore trailing spaces (PAD SPACE):
a unique index on such a column takes event ``abc`` for a duplicate of ``ABC`` or of ``"abc "``,
and the inbox silently discards the second event. :class:`ExactCharField` gives its column a
binary NO PAD collation there (``utf8mb4_nopad_bin`` on MariaDB, ``utf8mb4_0900_bin`` on MySQL
8), whatever the database's default. SQLite's ``BINARY`` and PostgreSQL's deterministic
collations already compare exactly, so elsewhere it is a plain ``CharField``.

A collation name belongs to one backend, so it cannot be a ``db_collation`` in a migration that
every backend runs: the field computes it for the connection at hand, and
:class:`AlterFieldOnMySQL` gives existing columns their new collation on MariaDB/MySQL only
(an ``AlterField`` elsewhere would rebuild a SQLite table for nothing).

``field__prefix="abc"`` (:class:`Prefix`) finds the values that start with ``abc``, compared
exactly, as a range the column's index serves where the column orders its values by code point;
:class:`UUIDPrefix` does the same for a ``UUIDField`` it is registered on.
"""

from __future__ import annotations

import uuid
from typing import Any

from django.core.exceptions import EmptyResultSet
from django.db import migrations, models
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.backends.base.schema import BaseDatabaseSchemaEditor
from django.db.migrations.state import ProjectState
from django.db.models.lookups import (
    GreaterThanOrEqual,
    LessThan,
    LessThanOrEqual,
    Lookup,
    StartsWith,
    UUIDStartsWith,
)

#: The binary NO PAD collation of utf8mb4, by server.
MARIADB_COLLATION = "utf8mb4_nopad_bin"
MYSQL_COLLATION = "utf8mb4_0900_bin"


def exact_collation(connection: BaseDatabaseWrapper) -> str | None:
    """The collation an exact column needs on *connection*, or None where the default is exact."""
    if connection.vendor != "mysql":
        return None
    return MARIADB_COLLATION if getattr(connection, "mysql_is_mariadb", False) else MYSQL_COLLATION


class ExactCharField(models.CharField):
    """A ``CharField`` compared byte for byte: case, accents and trailing spaces all count."""

    def _own_collation(self) -> bool:
        """A db_collation given to the field wins over the exact one."""
        return not getattr(self, "db_collation", None)  # (missing from django-stubs)

    def db_type(self, connection: BaseDatabaseWrapper) -> str | None:
        db_type = super().db_type(connection)
        if db_type and self._own_collation() and exact_collation(connection):
            # The collation belongs to utf8mb4: the column takes that character set whatever
            # the table's (MariaDB 10.11 creates latin1 tables on a server left as installed).
            return f"{db_type} CHARACTER SET utf8mb4"
        return db_type

    def db_parameters(self, connection: BaseDatabaseWrapper) -> dict[str, Any]:
        parameters = super().db_parameters(connection)
        if self._own_collation() and (collation := exact_collation(connection)):
            parameters["collation"] = collation
        return parameters


class AlterFieldOnMySQL(migrations.AlterField):
    """``AlterField`` that changes the database on MariaDB/MySQL only (see the module)."""

    def database_forwards(
        self,
        app_label: str,
        schema_editor: BaseDatabaseSchemaEditor,
        from_state: ProjectState,
        to_state: ProjectState,
    ) -> None:
        if exact_collation(schema_editor.connection):
            super().database_forwards(app_label, schema_editor, from_state, to_state)

    def database_backwards(
        self,
        app_label: str,
        schema_editor: BaseDatabaseSchemaEditor,
        from_state: ProjectState,
        to_state: ProjectState,
    ) -> None:
        if exact_collation(schema_editor.connection):
            super().database_backwards(app_label, schema_editor, from_state, to_state)

    def describe(self) -> str:
        return f"{super().describe()} (MariaDB/MySQL: a binary collation)"


@ExactCharField.register_lookup
class Prefix(Lookup):
    """``event_id__prefix="e0e0"``: the values that start with the prefix, case and all.

    ``LIKE 'e0e0%'`` (``startswith``) reads every row on SQLite, and on PostgreSQL unless the
    database's collation is exactly ``C``: an index on the column serves it only there. Where
    the column orders its values by code point (SQLite's ``BINARY``; PostgreSQL under the ``C``,
    ``POSIX`` or ``C.UTF-8`` collation), the values that start with ``p`` are exactly those in
    ``[p, p')``, ``p'`` being ``p`` with its last character the next one: a range of the index.
    Elsewhere (MariaDB/MySQL, whose binary collation has ``LIKE`` use the index already, and
    PostgreSQL under a linguistic collation) it is ``startswith``.
    """

    lookup_name = "prefix"
    prepare_rhs = False

    def as_sql(self, compiler: Any, connection: BaseDatabaseWrapper) -> Any:
        prefix = self.rhs
        if not isinstance(prefix, str) or not code_point_order(connection, self.lhs.output_field):
            return compiler.compile(StartsWith(self.lhs, self.rhs))
        low_sql, low_params = compiler.compile(GreaterThanOrEqual(self.lhs, prefix))
        upper = successor(prefix)
        if upper is None:
            return low_sql, low_params  # every value from the prefix on starts with it
        high_sql, high_params = compiler.compile(LessThan(self.lhs, upper))
        return f"({low_sql} AND {high_sql})", (*low_params, *high_params)


def successor(prefix: str) -> str | None:
    """The least string greater than every string that starts with *prefix* (in code point
    order), or None if there is none (*prefix* is empty or all U+10FFFF)."""
    chars = list(prefix)
    while chars:
        code = ord(chars[-1]) + 1
        if code == 0xD800:
            code = 0xE000  # past the surrogates, which no stored text holds
        if code <= 0x10FFFF:
            chars[-1] = chr(code)
            return "".join(chars)
        chars.pop()
    return None


#: (alias, database name) -> whether the PostgreSQL database's collation is by code point.
_POSTGRES_CODE_POINT: dict[tuple[str, str], bool] = {}


def code_point_order(connection: BaseDatabaseWrapper, field: Any) -> bool:
    """Whether *field*'s column on *connection* orders its text by code point."""
    if getattr(field, "db_collation", None):
        return False  # a collation of the project's own choosing
    if connection.vendor == "sqlite":
        return True  # BINARY: memcmp of UTF-8, which is code point order
    if connection.vendor != "postgresql":
        return False
    key = (connection.alias, str(connection.settings_dict.get("NAME")))
    if key not in _POSTGRES_CODE_POINT:
        with connection.cursor() as cursor:
            # As JSON: datlocprovider and datlocale exist only on recent servers.
            cursor.execute(
                "SELECT to_jsonb(d) FROM pg_database d WHERE datname = current_database()"
            )
            row = cursor.fetchone()
        _POSTGRES_CODE_POINT[key] = _postgres_code_point(row[0] if row else {})
    return _POSTGRES_CODE_POINT[key]


def _postgres_code_point(database: Any) -> bool:
    if isinstance(database, str):
        import json

        database = json.loads(database)
    provider = database.get("datlocprovider", "c")
    if provider == "b":
        return True  # PostgreSQL 17's builtin provider: C and C.UTF-8, both by code point
    if provider != "c":
        return False  # ICU: linguistic
    collate = str(database.get("datcollate", "")).lower().replace("-", "")
    return collate in ("c", "posix", "c.utf8")


#: The canonical text of a UUID, position by position: ``-`` or a hex digit.
_UUID_TEXT = "xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx"
_HEX = frozenset("0123456789abcdef")


def uuid_bounds(prefix: str) -> tuple[uuid.UUID, uuid.UUID] | None:
    """The least and the greatest UUID whose text starts with *prefix* (any case), or None
    if no UUID's text does."""
    prefix = prefix.lower()
    if len(prefix) > len(_UUID_TEXT):
        return None
    for char, slot in zip(prefix, _UUID_TEXT, strict=False):
        if (slot == "-") != (char == "-") or (slot != "-" and char not in _HEX):
            return None
    digits = prefix.replace("-", "")
    return uuid.UUID(digits.ljust(32, "0")), uuid.UUID(digits.ljust(32, "f"))


class UUIDPrefix(Lookup):
    """``original_event_id__prefix="e0e0"``: the rows of a ``UUIDField`` whose value's text
    starts so (a UUID has no case).

    Not registered on ``UUIDField`` itself: on a field class of the app
    (:class:`~idempotency.entities.EventIdField`) or a field instance. A range of UUIDs
    (``e0e00000-0000-... <= value <= e0e0ffff-ffff-...``), which an index on the column
    serves, on SQLite and PostgreSQL, where a UUID orders as its text does; ``startswith``
    elsewhere (MariaDB's UUID type orders its parts otherwise). A prefix no UUID's text starts
    with matches nothing.
    """

    lookup_name = "prefix"
    prepare_rhs = False

    def as_sql(self, compiler: Any, connection: BaseDatabaseWrapper) -> Any:
        if not isinstance(self.rhs, str):
            return compiler.compile(UUIDStartsWith(self.lhs, self.rhs))
        bounds = uuid_bounds(self.rhs)
        if bounds is None:
            raise EmptyResultSet
        if connection.vendor not in ("sqlite", "postgresql"):
            return compiler.compile(UUIDStartsWith(self.lhs, self.rhs.lower()))
        low_sql, low_params = compiler.compile(GreaterThanOrEqual(self.lhs, bounds[0]))
        high_sql, high_params = compiler.compile(LessThanOrEqual(self.lhs, bounds[1]))
        return f"({low_sql} AND {high_sql})", (*low_params, *high_params)
