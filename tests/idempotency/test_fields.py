"""Ids compared byte for byte on every backend (idempotency/fields.py), and check E011.

Run on MariaDB (``DATABASE_URL=mysql://...``, a test database with the server's default,
case-insensitive collation) these prove the migrations' binary collation; on SQLite and
PostgreSQL they prove the same behaviour with the database left as it was.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from io import StringIO

import pytest
from django.apps import apps
from django.core.management import call_command
from django.db import connection
from django.utils import timezone

from idempotency.checks import check_exact_columns
from idempotency.fields import ExactCharField, exact_collation
from idempotency.inbox import idempotent
from idempotency.models import DeadLetter, IdempotencyKey, OutboxMessage, ProcessedEvent
from orders.models import Order

#: Ids that an inexact collation takes for one another, with the id they would collide with.
VARIANTS = ["ABC", "abc", "Abc", "abc ", "\u00e1bc"]


def exact_fields() -> list[tuple[type, ExactCharField]]:
    return [
        (model, field)
        for model in apps.get_models()
        for field in model._meta.local_concrete_fields
        if isinstance(field, ExactCharField)
    ]


def test_the_ids_users_choose_are_exact_fields() -> None:
    named = {f"{model._meta.label}.{field.name}" for model, field in exact_fields()}
    assert {
        "idempotency.ProcessedEvent.consumer",
        "idempotency.ProcessedEvent.event_id",
        "idempotency.IdempotencyKey.owner",
        "idempotency.IdempotencyKey.endpoint",
        "idempotency.IdempotencyKey.key",
        "idempotency.DeliveryAttempt.task_id",
        "idempotency.DeliveryAttempt.event_id",
        "idempotency.OutboxMessage.event_id",
        "idempotency.DeadLetter.event_id",
        "orders.Order.order_id",
        "orders.Customer.customer_id",
        "orders.Product.product_id",
        "orders.Payment.payment_id",
        "orders.ConfirmationEmail.message_id",
    } <= named


@pytest.mark.django_db(transaction=True)
def test_events_that_differ_in_case_accents_or_trailing_spaces_are_distinct() -> None:
    for event_id in VARIANTS:
        with idempotent("billing", event_id) as claim:
            assert not claim.duplicate, f"{event_id!r} was taken for a duplicate"
    with idempotent("billing", "abc") as claim:
        assert claim.duplicate  # the same id, byte for byte, still is one
    assert sorted(ProcessedEvent.objects.values_list("event_id", flat=True)) == sorted(VARIANTS)
    assert ProcessedEvent.objects.filter(event_id="abc").count() == 1
    # Consumers are names too: "Billing" is not "billing".
    with idempotent("Billing", "abc") as claim:
        assert not claim.duplicate


@pytest.mark.django_db(transaction=True)
def test_http_keys_and_order_ids_that_differ_in_case_are_distinct() -> None:
    for key in VARIANTS:
        IdempotencyKey.objects.create(
            owner="1", endpoint="POST /api/orders/", key=key, locked_until=timezone.now()
        )
    assert IdempotencyKey.objects.filter(key="abc").count() == 1
    for order_id in ("ORD-1", "ord-1", "ORD-1 "):
        Order.objects.create(
            order_id=order_id,
            requested_customer_id="C",
            status="accepted",
            original_event_id=uuid.uuid4(),
        )
    assert Order.objects.get(order_id="ord-1").order_id == "ord-1"


@pytest.mark.django_db(transaction=True)
def test_the_outbox_and_dead_letters_of_ids_that_differ_in_case_are_apart() -> None:
    # The per-event page and the re-drive look rows up by event id: "ABC" is not "abc".
    for event_id in VARIANTS:
        OutboxMessage.objects.create(task_name="orders.tasks.place_order", event_id=event_id)
        DeadLetter.objects.create(reason=DeadLetter.Reason.FAILED, event_id=event_id)
    assert list(
        OutboxMessage.objects.filter(event_id="abc").values_list("event_id", flat=True)
    ) == ["abc"]
    assert list(DeadLetter.objects.filter(event_id="abc").values_list("event_id", flat=True)) == [
        "abc"
    ]


@pytest.mark.django_db
def test_every_exact_column_has_the_exact_collation() -> None:
    with connection.cursor() as cursor:
        described = {
            model._meta.db_table: {
                column.name: column
                for column in connection.introspection.get_table_description(
                    cursor, model._meta.db_table
                )
            }
            for model, _field in exact_fields()
        }
    for model, field in exact_fields():
        column = described[model._meta.db_table][field.column]
        if connection.vendor == "mysql":
            assert column.collation == exact_collation(connection), field
            assert column.null_ok is field.null, field  # (MODIFY keeps NOT NULL)
        else:
            # SQLite's BINARY, PostgreSQL's deterministic default: no collation of their own.
            assert column.collation is None, field


@pytest.mark.django_db(transaction=True)
def test_only_mariadb_and_mysql_get_a_collation() -> None:
    sql = StringIO()
    call_command("sqlmigrate", "idempotency", "0007", stdout=sql)
    statements = [
        line
        for line in sql.getvalue().splitlines()
        if not line.startswith(("--", "BEGIN", "COMMIT"))
    ]
    if connection.vendor == "mysql":
        assert len(statements) >= 6  # one per column (and its unique index kept)
        assert all(f"COLLATE `{exact_collation(connection)}`" in s for s in statements[:6])
        assert "CHARACTER SET utf8mb4" in statements[0]
    else:
        # No statement at all: a SQLite table is not rebuilt, a PostgreSQL column not rewritten.
        assert statements == []


@pytest.fixture
def case_insensitive_event_id() -> Iterator[str]:
    """The inbox's event_id column put back to the server's default, as a table made by hand."""
    if connection.vendor != "mysql":
        pytest.skip("collations are per column on MariaDB/MySQL only")
    table = ProcessedEvent._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(
            f"ALTER TABLE {table} MODIFY event_id varchar(255) CHARACTER SET utf8mb4 "
            "COLLATE utf8mb4_general_ci NOT NULL"
        )
    try:
        yield table
    finally:
        with connection.cursor() as cursor:
            cursor.execute(
                f"ALTER TABLE {table} MODIFY event_id varchar(255) CHARACTER SET utf8mb4 "
                f"COLLATE {exact_collation(connection)} NOT NULL"
            )


@pytest.mark.django_db(transaction=True)
def test_a_case_insensitive_column_is_e011(case_insensitive_event_id: str) -> None:
    messages = check_exact_columns(databases=["default"])
    assert [m.id for m in messages] == ["idempotency.E011"]
    assert f"{case_insensitive_event_id}.event_id" in messages[0].msg
    assert "utf8mb4_general_ci" in messages[0].msg
    assert exact_collation(connection) in (messages[0].hint or "")
    # What E011 prevents: the second event discarded as a duplicate of the first.
    with idempotent("billing", "ABC") as claim:
        assert not claim.duplicate
    with idempotent("billing", "abc") as claim:
        assert claim.duplicate


@pytest.mark.django_db
def test_the_migrated_columns_pass_e011() -> None:
    assert check_exact_columns(databases=["default"]) == []
    assert check_exact_columns() == []  # not a database run: no query
