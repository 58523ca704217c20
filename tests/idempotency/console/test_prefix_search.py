"""The start of an event id, searched as a range of the index, compared exactly.

``LIKE 'e0e0%'`` reads every record on SQLite and on PostgreSQL under any collation but ``C``
(``C.UTF-8`` included), and ``istartswith`` everywhere; the inbox is the biggest table there is
(docs/scaling.md plans for billions of records). ``event_id__prefix`` is a range of the index
where the column orders by code point, and ``LIKE`` elsewhere.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
from django.db import connection, models, transaction
from django.test import Client
from django.test.utils import CaptureQueriesContext

from idempotency.console.story import matching_event_ids
from idempotency.fields import _postgres_code_point, code_point_order, successor
from idempotency.models import DeadLetter, OutboxMessage, ProcessedEvent
from orders.models import Order
from tests.factories import OrderFactory, UserFactory

#: Ids around the prefix "abc": the highest code points after it, and its neighbours.
IDS = ["ab", "abc", "abc\uffff", "abc\U0010ffff", "abcd", "abd", "ABC1", "abb\U0010ffff"]


def test_the_successor_of_a_prefix() -> None:
    assert successor("abc") == "abd"
    assert successor("ab\U0010ffff") == "ac"
    assert successor("a\ud7ff") == "a\ue000"  # past the surrogates
    assert successor("\U0010ffff") is None
    assert successor("") is None


@pytest.mark.parametrize(
    ("database", "by_code_point"),
    [
        ({"datcollate": "C"}, True),  # before PostgreSQL 15: no datlocprovider
        ({"datlocprovider": "c", "datcollate": "POSIX"}, True),
        ({"datlocprovider": "c", "datcollate": "C.UTF-8"}, True),
        ({"datlocprovider": "c", "datcollate": "C.utf8"}, True),
        ({"datlocprovider": "b", "datcollate": "C", "datlocale": "C.UTF-8"}, True),
        ({"datlocprovider": "c", "datcollate": "en_US.UTF-8"}, False),
        ({"datlocprovider": "i", "datcollate": "und-x-icu"}, False),
    ],
)
def test_which_postgresql_collations_order_by_code_point(
    database: dict[str, str], by_code_point: bool
) -> None:
    assert _postgres_code_point(database) is by_code_point


def test_a_collation_of_the_projects_own_is_left_to_like() -> None:
    field = models.CharField(max_length=10, db_collation="und-x-icu")
    assert code_point_order(connection, field) is False


@pytest.mark.django_db
@pytest.mark.parametrize("model", [ProcessedEvent, OutboxMessage, DeadLetter])
def test_a_prefix_finds_exactly_the_ids_that_start_with_it(model: type[models.Model]) -> None:
    for n, event_id in enumerate(IDS):
        create(model, event_id, n)
    found = model._default_manager.filter(event_id__prefix="abc").values_list("event_id")
    assert sorted(each for (each,) in found) == sorted(
        ["abc", "abc\uffff", "abc\U0010ffff", "abcd"]
    )
    upper = model._default_manager.filter(event_id__prefix="ABC").values_list("event_id")
    assert [each for (each,) in upper] == ["ABC1"]  # ids compare byte for byte


@pytest.mark.django_db
def test_the_console_search_is_exact_too() -> None:
    for n, event_id in enumerate(IDS):
        create(ProcessedEvent, event_id, n)
    assert matching_event_ids("ABC") == ["ABC1"]
    assert "abd" not in matching_event_ids("abc")


@pytest.mark.django_db
@pytest.mark.parametrize("changelist", ["processedevent", "outboxmessage", "deadletter"])
def test_the_changelists_search_a_range_not_a_like(changelist: str) -> None:
    client = Client()
    client.force_login(UserFactory(username="root", is_staff=True, is_superuser=True))
    model = {"processedevent": ProcessedEvent, "outboxmessage": OutboxMessage}.get(
        changelist, DeadLetter
    )
    create(model, "e0e00000-0000-4000-8000-000000000001")
    with CaptureQueriesContext(connection) as queries:
        response = client.get(f"/admin/idempotency/{changelist}/", {"q": "e0e00000-0000"})
    assert len(response.context["cl"].result_list) == 1
    quote = connection.ops.quote_name
    column = f"{quote(f'idempotency_{changelist}')}.{quote('event_id')}"
    searched = [q["sql"] for q in queries if column in q["sql"] and "e0e00000-0000" in q["sql"]]
    assert len(searched) >= 2  # the count and the page, and the counts above the list
    for sql in searched:
        if connection.vendor == "mysql":
            # A binary collation's prefix LIKE is a range of the index already.
            assert f"{column} LIKE BINARY" in sql, sql
        else:
            assert f"{column} >=" in sql, sql
            assert "LIKE" not in sql.upper(), sql  # no part of the search reads every record


def plan(queryset: Any) -> str:
    sql, params = queryset.query.sql_with_params()
    with connection.cursor() as cursor:
        if connection.vendor == "sqlite":
            cursor.execute(f"EXPLAIN QUERY PLAN {sql}", params)
            return " | ".join(str(row[-1]) for row in cursor.fetchall())
        cursor.execute(f"EXPLAIN {sql}", params)
        return " | ".join(row[0].strip() for row in cursor.fetchall())


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("model", "lookup"),
    [
        (ProcessedEvent, "event_id__prefix"),
        (OutboxMessage, "event_id__prefix"),
        (DeadLetter, "event_id__prefix"),
        (Order, "original_event_id__prefix"),
    ],
)
def test_the_search_is_a_range_of_an_index(model: type[models.Model], lookup: str) -> None:
    if connection.vendor not in ("sqlite", "postgresql"):
        pytest.skip(f"LIKE on {connection.vendor}, whose binary collation indexes it")
    if connection.vendor == "postgresql" and not code_point_order(connection, None):
        pytest.skip("a linguistic collation: LIKE, which no index of these serves")
    if model is Order:
        OrderFactory(original_event_id="e0e00000-0000-4000-8000-000000000001")
    else:
        create(model, "e0e00000-0000-4000-8000-000000000001", 0)
    queryset = model._default_manager.filter(**{lookup: "e0e00000-0000"})
    with transaction.atomic():
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute("SET LOCAL enable_seqscan = off")  # a few rows: it would scan
        shown = plan(queryset)
    column = lookup.split("__")[0]
    if connection.vendor == "sqlite":
        assert re.search(r"USING (COVERING )?INDEX", shown), shown
        assert f"{column}>?" in shown, shown
    else:
        assert "Index Cond" in shown, shown
        assert column in shown.split("Index Cond")[1], shown
        assert "~~" not in shown, shown  # LIKE
        assert "upper(" not in shown, shown
    assert [str(getattr(each, column)) for each in queryset] == [
        "e0e00000-0000-4000-8000-000000000001"
    ]


def create(model: type[models.Model], event_id: str, n: int = 0) -> models.Model:
    if model is ProcessedEvent:
        return ProcessedEvent.objects.create(consumer="c", event_id=event_id, fingerprint="a" * 64)
    if model is OutboxMessage:
        return OutboxMessage.objects.create(task_name="t", event_id=event_id)
    return DeadLetter.objects.create(reason="failed", task_name="t", event_id=event_id)
