"""The benchmarks' own PostgreSQL database, made afresh for each run."""

from __future__ import annotations

import os
import sys
from typing import Any

import dj_database_url
import psycopg
from django.db import connection

DEFAULT_URL = "postgres://postgres@127.0.0.1:5432/idempotency_bench"


def recreate(url: str) -> None:
    """Drop and create the database of *url*; only one whose name ends in ``_bench``."""
    config = dj_database_url.parse(url)
    name = config["NAME"]
    if not name.endswith("_bench"):
        sys.exit(f"refusing to recreate {name!r}: the benchmark database's name must end in _bench")
    admin = psycopg.connect(
        host=config.get("HOST") or "127.0.0.1",
        port=config.get("PORT") or 5432,
        user=config.get("USER") or None,
        password=config.get("PASSWORD") or None,
        dbname="postgres",
        autocommit=True,
    )
    with admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{name}"')


def bench_url() -> str:
    return os.environ.get("DATABASE_URL") or DEFAULT_URL


def sql(statement: str, params: list[object] | None = None) -> list[tuple[Any, ...]]:
    """Run *statement* on Django's default connection; its rows, if it returns any."""
    with connection.cursor() as cursor:
        cursor.execute(statement, params or [])
        return cursor.fetchall() if cursor.description else []


def percentile(values: list[float], q: float) -> float:
    """The *q* quantile of *values* (nearest rank), NaN for none."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
