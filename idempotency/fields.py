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
"""

from __future__ import annotations

from typing import Any

from django.db import migrations, models
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.backends.base.schema import BaseDatabaseSchemaEditor
from django.db.migrations.state import ProjectState

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
