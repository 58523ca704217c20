"""The database's clock: the one every process that orders or purges records agrees on."""

from __future__ import annotations

from datetime import datetime

from django.db import connections
from django.db.models import DateTimeField
from django.db.models.functions import Now
from django.db.models.sql import Query


def database_now(using: str) -> datetime:
    """``now()`` as the database *using* tells it (an aware datetime when ``USE_TZ``)."""
    connection = connections[using]
    query = Query(None)
    now = Now().resolve_expression(query)
    # compile() picks the vendor's form; on SQLite it keeps the milliseconds that plain
    # CURRENT_TIMESTAMP drops.
    sql, params = query.get_compiler(using).compile(now)
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT {sql}", params)
        (value,) = cursor.fetchone()
    for converter in connection.ops.get_db_converters(now):
        value = converter(value, now, connection)
    result: datetime = DateTimeField().to_python(value)
    return result
