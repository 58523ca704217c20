"""Tasks for the real-worker tests of idempotency.celery, imported by the worker (``--include``).

``TEST_IDEMPOTENCY`` (JSON) overrides keys of ``settings.IDEMPOTENCY`` in the worker, with
timedeltas given in seconds for the keys that take one.
"""

from __future__ import annotations

import json
import os
import time
from datetime import timedelta
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.db import transaction
from django.test.utils import override_settings

from idempotency.celery import idempotent_task

_DURATIONS = {"TRANSIENT_RETRY_WINDOW", "RETENTION"}


def _overrides() -> None:
    raw = os.environ.get("TEST_IDEMPOTENCY")
    if not raw:
        return
    values: dict[str, Any] = json.loads(raw)
    for key in _DURATIONS & set(values):
        values[key] = timedelta(seconds=values[key])
    # Sent as setting_changed, so app_settings drops its cache, before any child forks.
    override_settings(IDEMPOTENCY={**getattr(settings, "IDEMPOTENCY", {}), **values}).enable()


_overrides()


def _dead_letters_unstorable() -> None:
    """``TEST_DEAD_LETTERS_UNSTORABLE=<path>``: while the file exists, every dead letter the
    worker stores fails, as in an outage that begins after the effect committed."""
    flag = os.environ.get("TEST_DEAD_LETTERS_UNSTORABLE")
    if not flag:
        return
    from unittest import mock

    from django.db import OperationalError

    from idempotency.deadletters import store

    stored = store._store

    def store_unless_flagged(fields: Any) -> Any:
        if os.path.exists(flag):
            raise OperationalError(f"the dead letters cannot be stored ({flag} exists)")
        return stored(fields)

    mock.patch.object(store, "_store", side_effect=store_unless_flagged).start()


_dead_letters_unstorable()


@idempotent_task(name="tests.worker.apply_event")
def apply_event(event: dict[str, Any]) -> str:
    """The effect is the inbox record itself."""
    return str(event["eventId"])


@idempotent_task(name="tests.worker.outlive_the_time_limit", soft_time_limit=1, time_limit=2)
def outlive_the_time_limit(event: dict[str, Any]) -> None:
    """Swallows the soft limit, so every delivery ends in a hard kill."""
    try:
        time.sleep(30)
    except SoftTimeLimitExceeded:
        time.sleep(30)


@idempotent_task(name="tests.worker.hook_raises_after_commit")
def hook_raises_after_commit(event: dict[str, Any]) -> str:
    def hook() -> None:
        raise RuntimeError("a notification after the commit failed")

    transaction.on_commit(hook)
    return "applied"
