"""The settings every benchmark runs with: the example project's, as production runs them.

``DEBUG`` is off: with it on, Django wraps every cursor to record each query, which penalises
whichever approach issues more statements. ``IDEMPOTENCY`` holds the library's defaults, not
the example's (which turns ``RECORD_DUPLICATES`` on so its API can count duplicates).

``BENCH_DEBUG=1`` and ``BENCH_IDEMPOTENCY`` (a JSON object of keys of ``IDEMPOTENCY``) measure
otherwise; :mod:`bench.runtime` sets them from the ``--debug`` and ``--idempotency`` flags, and
every process a benchmark starts (a Celery worker, a child) inherits them.
"""

from __future__ import annotations

import json
import os

from project.settings import *  # noqa: F403

DEBUG = os.environ.get("BENCH_DEBUG", "0") == "1"
IDEMPOTENCY = json.loads(os.environ.get("BENCH_IDEMPOTENCY") or "{}")
