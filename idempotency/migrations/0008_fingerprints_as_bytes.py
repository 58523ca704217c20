"""The inbox's two fingerprints as 32 raw bytes instead of 64 hex characters: 33 bytes a
record on disk instead of 65 (docs/storage.md). The values are converted, not dropped.

PostgreSQL converts each column in place with one ``ALTER COLUMN ... TYPE bytea USING ...``,
which rewrites the table under an ACCESS EXCLUSIVE lock: claims wait for it (about a second
per million records on this project's benchmark machine). Other backends alter the column as
Django does, then convert the rows one by one. Reversible.

A value that is not 64 hex characters (``claim(fingerprint=...)`` took any text up to 64
characters before this version) becomes the SHA-256 of its UTF-8 bytes: it still tells one
payload from another, and the upgrade never stops on it. On MariaDB and MySQL, which cannot
roll DDL back, a conversion stopped half-way is finished by running ``migrate`` again: a value
already 32 bytes long is left as it is.
"""

import hashlib
import re
from typing import Any

from django.db import migrations, models
from django.db.backends.base.schema import BaseDatabaseSchemaEditor
from django.db.migrations.state import ProjectState

import idempotency.inbox.models

TABLE = "idempotency_processedevent"


_HEX = re.compile(rb"[0-9a-fA-F]{64}")


def _raw(value: Any) -> bytes:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    return str(value).encode()


def _as_digest(value: Any) -> bytes:
    """A stored value in its new form; a converted one (32 bytes) or none (empty) unchanged."""
    raw = _raw(value)
    if _HEX.fullmatch(raw):
        return bytes.fromhex(raw.decode())
    if len(raw) in (0, 32):
        return raw
    return hashlib.sha256(raw).digest()


def _as_hex(value: Any) -> bytes:
    """A stored value in its old form; one already back in it (hex text) unchanged."""
    raw = _raw(value)
    return raw.hex().encode() if len(raw) == 32 else raw


def _convert(schema_editor: BaseDatabaseSchemaEditor, column: str, form: Any) -> None:
    with schema_editor.connection.cursor() as cursor:
        cursor.execute(f"SELECT id, {column} FROM {TABLE}")
        rows = cursor.fetchall()
        for pk, value in rows:
            if value is None:
                continue
            # Written even when unchanged: SQLite keeps the type of a value, and an empty
            # fingerprint copied as text would not equal the empty bytes lookups compare with.
            new = form(value)
            stored = new if form is _as_digest else new.decode()
            cursor.execute(f"UPDATE {TABLE} SET {column} = %s WHERE id = %s", [stored, pk])


class StoreDigestAsBytes(migrations.AlterField):
    """AlterField from a hex ``CharField`` to a ``DigestField``, converting the values."""

    def database_forwards(
        self,
        app_label: str,
        schema_editor: BaseDatabaseSchemaEditor,
        from_state: ProjectState,
        to_state: ProjectState,
    ) -> None:
        column = schema_editor.quote_name(self.name)
        if schema_editor.connection.vendor == "postgresql":
            schema_editor.execute(
                f"ALTER TABLE {TABLE} ALTER COLUMN {column} TYPE bytea USING CASE "
                f"WHEN {column} ~ '^[0-9a-fA-F]{{64}}$' THEN decode({column}, 'hex') "
                f"WHEN {column} = '' THEN ''::bytea "
                f"ELSE sha256(convert_to({column}, 'UTF8')) END"
            )
            return
        super().database_forwards(app_label, schema_editor, from_state, to_state)
        # The altered column still holds the hex text (or its bytes): decode each value.
        _convert(schema_editor, column, _as_digest)

    def database_backwards(
        self,
        app_label: str,
        schema_editor: BaseDatabaseSchemaEditor,
        from_state: ProjectState,
        to_state: ProjectState,
    ) -> None:
        column = schema_editor.quote_name(self.name)
        if schema_editor.connection.vendor == "postgresql":
            schema_editor.execute(
                f"ALTER TABLE {TABLE} ALTER COLUMN {column} TYPE varchar(64) "
                f"USING encode({column}, 'hex')"
            )
            return
        _convert(schema_editor, column, _as_hex)
        # AlterField's backwards is its forwards with the states swapped: the plain alteration,
        # not this class's conversion.
        migrations.AlterField.database_forwards(self, app_label, schema_editor, from_state, to_state)


class Migration(migrations.Migration):
    dependencies = [
        ("idempotency", "0007_exact_collation_on_mysql"),
    ]

    operations = [
        StoreDigestAsBytes(
            model_name="processedevent",
            name="fingerprint",
            field=idempotency.inbox.models.DigestField(
                blank=True,
                default="",
                help_text="SHA-256 of the canonical JSON payload of the first delivery.",
                max_length=32,
                verbose_name="payload fingerprint",
            ),
        ),
        StoreDigestAsBytes(
            model_name="processedevent",
            name="mismatch_fingerprint",
            field=idempotency.inbox.models.DigestField(
                blank=True,
                default="",
                help_text="Fingerprint of the last delivery that reused this id with another payload.",
                max_length=32,
                verbose_name="mismatched fingerprint",
            ),
        ),
    ]
