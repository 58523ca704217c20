"""docs/patterns.md §3: the data migration that re-keys records stored when composite keys were
joined unescaped and their parts stripped, taken from the page as written and run as a
``RunPython`` operation on a few records in the old format."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
from django.db import connection, migrations
from django.db.migrations.loader import MigrationLoader

from idempotency.keys import extract_key
from idempotency.models import ProcessedEvent
from tests.services import ROOT

# transaction=True: a migration's schema editor (SQLite's) cannot start inside a test's transaction.
pytestmark = pytest.mark.django_db(transaction=True)

CONSUMER = "orders.tasks.payment_received"  # the consumer the snippet names
KEY = ("orderId", "paymentId")
PYTHON = re.compile(r"^```python\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def the_snippet() -> Callable[[Any, Any], None]:
    """The page's ``rekey`` function, as a reader would paste it into a migration."""
    blocks = [
        b for b in PYTHON.findall((ROOT / "docs" / "patterns.md").read_text()) if "def rekey(" in b
    ]
    assert len(blocks) == 1, "docs/patterns.md §3 has one rekey snippet"
    namespace: dict[str, Any] = {}
    exec(compile(blocks[0], "docs/patterns.md", "exec"), namespace)
    rekey: Callable[[Any, Any], None] = namespace["rekey"]
    return rekey


def old_key(order_id: str, payment_id: str) -> str:
    """How composite keys were built before: each part stripped, joined with "|" unescaped."""
    return f"{order_id.strip()}|{payment_id.strip()}"


def migrate_with(code: Callable[[Any, Any], None]) -> None:
    """Apply ``RunPython(code)`` as ``migrate`` would, on the models' historical state."""
    operation = migrations.RunPython(code, migrations.RunPython.noop)
    state = MigrationLoader(connection).project_state()
    with connection.schema_editor(atomic=True) as editor:
        operation.database_forwards("orders", editor, state, state.clone())


#: (orderId, paymentId) of events recorded in the old format, and whether the key changes.
EVENTS = [
    ("ORD-1|A", "PAY-2", True),  # a "|" inside a part
    ("ORD-2\\x", "PAY-3", True),  # a "\" inside a part
    (" ORD-3 ", "PAY-4", True),  # surrounding white space, once stripped
    ("ORD-4", "PAY-5", False),  # the usual case: the same key in both formats
]


def test_the_documented_data_migration_rekeys_the_old_records() -> None:
    records = {}
    for order_id, payment_id, _ in EVENTS:
        payload = {"orderId": order_id, "paymentId": payment_id, "amount": "10.00"}
        records[order_id] = ProcessedEvent.objects.create(
            consumer=CONSUMER, event_id=old_key(order_id, payment_id), payload=payload
        )
    # Without a stored payload the parts are unknown: the record keeps its old key.
    unknown = ProcessedEvent.objects.create(consumer=CONSUMER, event_id="ORD-5|B|PAY-6")
    # Another consumer's record of the same old key is not the migration's business.
    other = ProcessedEvent.objects.create(
        consumer="tests.other", event_id=old_key("ORD-1|A", "PAY-2"), payload={"x": 1}
    )
    # Before the migration, a redelivery of the escaped or unstripped events misses its record.
    for order_id, payment_id, changes in EVENTS:
        event = {"orderId": order_id, "paymentId": payment_id}
        found = ProcessedEvent.objects.for_consumer(CONSUMER).for_event(extract_key(event, KEY))
        assert found.exists() is not changes, order_id

    migrate_with(the_snippet())

    for order_id, payment_id, changes in EVENTS:
        record = ProcessedEvent.objects.get(pk=records[order_id].pk)
        # The key the library computes for the same event now finds its record: a duplicate.
        assert record.event_id == extract_key({"orderId": order_id, "paymentId": payment_id}, KEY)
        assert (record.event_id != old_key(order_id, payment_id)) is changes, record.event_id
    assert ProcessedEvent.objects.get(pk=records["ORD-1|A"].pk).event_id == "ORD-1\\|A|PAY-2"
    assert ProcessedEvent.objects.get(pk=records["ORD-2\\x"].pk).event_id == "ORD-2\\\\x|PAY-3"
    assert ProcessedEvent.objects.get(pk=records[" ORD-3 "].pk).event_id == " ORD-3 |PAY-4"
    assert ProcessedEvent.objects.get(pk=unknown.pk).event_id == "ORD-5|B|PAY-6"
    assert ProcessedEvent.objects.get(pk=other.pk).event_id == "ORD-1|A|PAY-2"
    assert ProcessedEvent.objects.count() == len(EVENTS) + 2

    # Run again (a migration re-applied after a failure half-way): nothing changes.
    before = dict(ProcessedEvent.objects.values_list("pk", "event_id"))
    migrate_with(the_snippet())
    assert dict(ProcessedEvent.objects.values_list("pk", "event_id")) == before
