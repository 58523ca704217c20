"""Fill the inbox with N records fast, in the shape the library writes by default.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/idempotency_bench python -m bench.fill 1000000

One ``INSERT ... SELECT ... FROM generate_series`` per call: on this machine kind about
100,000 records a second, against about 500 claims a second through the library. The default
shape is what a Celery task decorated with ``@idempotent_task`` writes with the library's
defaults: the task's name as the consumer, a UUID event id, the payload's SHA-256 fingerprint,
outcome ``processed``, the task's result (``STORE_RESULTS`` is on; the orders example returns
``{"orderId", "status", "reason"}``), no payload (``STORE_PAYLOADS`` is off) and no duplicate
bookkeeping (``RECORD_DUPLICATES`` is off).

The statement is built from the model's concrete fields, so a change to the inbox's columns
needs an edit in one place only: :data:`SHAPE` gives the SQL of the columns the default shape
sets; every other column takes the model's default (``default=`` or ``db_default=``), or NULL.
"""

from __future__ import annotations

import argparse
import time
from datetime import datetime, timedelta

from bench import runtime

runtime.setup()  # bench/settings.py: DEBUG off, the library's defaults

from django.db import connection, models  # noqa: E402
from django.utils import timezone  # noqa: E402

from idempotency.models import ProcessedEvent  # noqa: E402

TABLE = ProcessedEvent._meta.db_table
#: Consumer names as ``@idempotent_task`` derives them (the task's name), round robin.
CONSUMERS = ["orders.tasks.place_order", "billing.tasks.debit", "shipping.tasks.ship"]

#: Per field name, the SQL of its value in the default shape; ``g`` is the record's number in
#: the series (unique across calls with increasing *start*), ``{consumers}`` and ``{at}`` are
#: replaced by placeholders. Fields not listed take the model's default.
SHAPE = {
    "consumer": "({consumers}::text[])[1 + mod(g, {n_consumers})]",
    "event_id": "gen_random_uuid()::text",
    "processed_at": "{at}",
    "fingerprint": "sha256(('event-' || g)::bytea)",
    "result": ("jsonb_build_object('orderId', 'ORD-' || g, 'status', 'accepted', 'reason', '')"),
}


def insert_statement(
    count: int, start: int, first_at: datetime, last_at: datetime
) -> tuple[str, list[object]]:
    """The INSERT of *count* records numbered from *start*, processed_at spread evenly from
    *first_at* to *last_at* in id order (as claims made over that time would be)."""
    step = (last_at - first_at) / max(1, count - 1)
    columns: list[str] = []
    values: list[str] = []
    params: list[object] = []
    for field in ProcessedEvent._meta.concrete_fields:
        assert isinstance(field, models.Field)
        if field.primary_key:
            continue  # the sequence's, so ids follow processed_at as they do in production
        if field.name in SHAPE:
            expression = SHAPE[field.name].format(
                consumers="%s",
                n_consumers=len(CONSUMERS),
                at="%s::timestamptz + (g - %s) * %s::interval",
            )
            if "{consumers}" in SHAPE[field.name]:
                params.append(CONSUMERS)
            if "{at}" in SHAPE[field.name]:
                params.extend([first_at, start, step])
        elif field.db_default is not models.NOT_PROVIDED:
            continue  # the column's own default, as a claim leaves it
        elif field.has_default():
            value = field.get_db_prep_save(field.get_default(), connection)
            if value is None:
                expression = "NULL"
            else:
                expression = "%s"
                params.append(value)
        elif field.null:
            expression = "NULL"
        else:
            raise ValueError(f"no value for {TABLE}.{field.column}: add it to bench.fill.SHAPE")
        columns.append(connection.ops.quote_name(field.column))
        values.append(expression)
    statement = (
        f"INSERT INTO {connection.ops.quote_name(TABLE)} ({', '.join(columns)}) "
        f"SELECT {', '.join(values)} FROM generate_series(%s, %s) AS g"
    )
    return statement, [*params, start, start + count - 1]


def fill(
    count: int,
    *,
    start: int = 1,
    first_at: datetime | None = None,
    last_at: datetime | None = None,
    vacuum: bool = True,
) -> None:
    """Add *count* records, processed_at spread from *first_at* to *last_at* (default: over
    the retention window ending now), then VACUUM ANALYZE the table unless told not to.

    Call again with *start* past the previous call's records to grow the table in place.
    """
    from idempotency.conf import app_settings

    runtime.require_postgresql("the fill is written for PostgreSQL")
    last = last_at or timezone.now()
    first = first_at or last - (app_settings.RETENTION or timedelta(days=30))
    statement, params = insert_statement(count, start, first, last)
    with connection.cursor() as cursor:
        cursor.execute(statement, params)
        if vacuum:
            cursor.execute(f"VACUUM ANALYZE {connection.ops.quote_name(TABLE)}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("count", type=int, help="records to add")
    parser.add_argument("--truncate", action="store_true", help="empty the inbox first")
    runtime.add_arguments(parser)
    args = parser.parse_args()
    runtime.require_postgresql("the fill is written for PostgreSQL")
    with connection.cursor() as cursor:
        if args.truncate:
            cursor.execute(f"TRUNCATE {connection.ops.quote_name(TABLE)} RESTART IDENTITY")
        cursor.execute(f"SELECT coalesce(max(id), 0) FROM {connection.ops.quote_name(TABLE)}")
        (start,) = cursor.fetchone()
    began = time.monotonic()
    fill(args.count, start=int(start) + 1)
    seconds = time.monotonic() - began
    print(f"{args.count:,} records in {seconds:.1f} s ({args.count / seconds:,.0f}/s)")


if __name__ == "__main__":
    main()
