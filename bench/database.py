"""The benchmarks' own PostgreSQL database, made afresh for each run."""

from __future__ import annotations

import os
import sys

import dj_database_url
import psycopg

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
