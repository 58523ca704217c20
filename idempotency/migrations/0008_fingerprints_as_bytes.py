"""The inbox's two fingerprints as 32 raw bytes instead of 64 hex characters: 33 bytes a
record on disk instead of 65 (docs/storage.md). The values are converted, not dropped.

PostgreSQL converts each column in place with one ``ALTER COLUMN ... TYPE bytea USING
decode(..., 'hex')``, which rewrites the table under an ACCESS EXCLUSIVE lock: claims wait
for it (about a second per million records on this project's benchmark machine). Other
backends alter the column as Django does, then convert the rows one by one. Reversible.
"""

from typing import Any

from django.db import migrations, models
from django.db.backends.base.schema import BaseDatabaseSchemaEditor
from django.db.migrations.state import ProjectState

import idempotency.inbox.models

TABLE = "idempotency_processedevent"


def _text(value: Any) -> str:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("ascii")
    return str(value)


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
                f"ALTER TABLE {TABLE} ALTER COLUMN {column} TYPE bytea USING decode({column}, 'hex')"
            )
            return
        super().database_forwards(app_label, schema_editor, from_state, to_state)
        # The altered column still holds the hex text (or its bytes): decode each value.
        with schema_editor.connection.cursor() as cursor:
            cursor.execute(f"SELECT id, {column} FROM {TABLE}")
            rows = cursor.fetchall()
            for pk, value in rows:
                if value is not None:
                    cursor.execute(
                        f"UPDATE {TABLE} SET {column} = %s WHERE id = %s",
                        [bytes.fromhex(_text(value)), pk],
                    )

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
        with schema_editor.connection.cursor() as cursor:
            cursor.execute(f"SELECT id, {column} FROM {TABLE}")
            rows = cursor.fetchall()
            for pk, value in rows:
                if value is not None:
                    cursor.execute(
                        f"UPDATE {TABLE} SET {column} = %s WHERE id = %s",
                        [bytes(value).hex(), pk],
                    )
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
