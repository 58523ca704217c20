"""What every benchmark entry point runs first: Django on :mod:`bench.settings`, and a record
of the settings the measuring process really ran with.

    from bench import runtime
    runtime.setup()          # before any model import: parses --debug and --idempotency

``--debug`` turns ``DEBUG`` on; ``--idempotency KEY=JSON`` (repeatable) sets a key of
``IDEMPOTENCY`` (``--idempotency RECORD_DUPLICATES=true``). Without them a benchmark measures
``DEBUG`` off and the library's defaults. The flags become environment variables, so the
processes a benchmark starts (Celery workers, ``python -m bench``'s modules) measure the same.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

SETTINGS_MODULE = "bench.settings"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags :func:`setup` reads, so that each module's own parser accepts them too."""
    parser.add_argument("--debug", action="store_true", help="measure with DEBUG on (default: off)")
    parser.add_argument(
        "--idempotency",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="a key of IDEMPOTENCY, e.g. RECORD_DUPLICATES=true (default: the library's)",
    )


def export(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser)
    known, _ = parser.parse_known_args(argv)
    if known.debug:
        os.environ["BENCH_DEBUG"] = "1"
    if known.idempotency:
        overrides = json.loads(os.environ.get("BENCH_IDEMPOTENCY") or "{}")
        for item in known.idempotency:
            key, sep, value = item.partition("=")
            if not sep:
                sys.exit(f"--idempotency {item!r}: expected KEY=JSON")
            overrides[key] = json.loads(value)
        os.environ["BENCH_IDEMPOTENCY"] = json.dumps(overrides)


def setup(argv: list[str] | None = None) -> None:
    """Export the flags, point Django at :mod:`bench.settings` and set it up."""
    export(sys.argv[1:] if argv is None else argv)
    # Assigned, not defaulted: a DJANGO_SETTINGS_MODULE left in the shell would otherwise
    # measure the example's settings.
    os.environ["DJANGO_SETTINGS_MODULE"] = SETTINGS_MODULE
    os.environ.setdefault("IDEMPOTENCY_LOG_LEVEL", "WARNING")
    import django

    django.setup()


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def describe(using: str = "default") -> dict[str, Any]:
    """The settings that matter to the figures, as this process has them.

    Read from the running process (Django's settings, the app's, the database session), not
    assumed from the settings module, so the report shows what was measured.
    """
    from django.conf import settings
    from django.db import connections

    from idempotency.conf import app_settings

    connection = connections[using]
    options = connection.settings_dict.get("OPTIONS", {})
    isolation = "?"
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SHOW transaction_isolation")
            isolation = cursor.fetchone()[0]
    pool = options.get("pool")
    return {
        "settings module": os.environ.get("DJANGO_SETTINGS_MODULE", ""),
        "DEBUG": settings.DEBUG,
        "RECORD_DUPLICATES": app_settings.RECORD_DUPLICATES,
        "STORE_RESULTS": app_settings.STORE_RESULTS,
        "STORE_PAYLOADS": app_settings.STORE_PAYLOADS,
        "isolation level": isolation,
        "CONN_MAX_AGE": connection.settings_dict.get("CONN_MAX_AGE"),
        "pool": "none" if not pool else json.dumps(pool, default=str),
        "server-side binding": bool(options.get("server_side_binding")),
        "CPU": f"{os.cpu_count()} x {cpu_model()}",
        "Python": platform.python_version(),
    }


def require_postgresql(what: str = "the benchmark measures PostgreSQL") -> None:
    """Exit with a clear message unless the default database is PostgreSQL."""
    from django.db import connection

    if connection.vendor != "postgresql":
        sys.exit(f"set DATABASE_URL=postgres://... : {what}")
