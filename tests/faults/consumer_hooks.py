"""Kill points of a plain consumer (``manage.py consume_events``) in the fault-injection suite.

The consumer's handler is :func:`credit`, the countable effect of
``tests.idempotency.consumers.handlers`` with two points a test can arm through the directory
named in ``FAULTS_DIR``:

``plan/<event id>@inside``
    The event is claimed and its writes made, the transaction still open: SIGKILL. Nothing of
    it may survive; the redelivery applies it.
``plan/<event id>@after-commit``
    The transaction committed, the message not acknowledged yet (``on_commit``): SIGKILL. The
    redelivery must be discarded by the inbox.

``fired/<event id>@<point>`` is created exclusively when a point fires, so each fires once,
and ``journal.log`` gets one line per observation (``applied``, ``killed``).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

from django.db import transaction

from tests.idempotency.consumers import handlers

POINTS = ("inside", "after-commit")


def _directory() -> Path | None:
    value = os.environ.get("FAULTS_DIR")
    return Path(value) if value else None


def journal(line: str) -> None:
    directory = _directory()
    if directory is not None:
        with (directory / "journal.log").open("a") as out:
            out.write(f"{line}\n")


def _fires(event_id: str, point: str) -> bool:
    directory = _directory()
    if directory is None or not (directory / "plan" / f"{event_id}@{point}").exists():
        return False
    fired = directory / "fired"
    fired.mkdir(exist_ok=True)
    try:
        # Exclusive: the redelivery after the kill goes through.
        (fired / f"{event_id}@{point}").open("x").close()
    except FileExistsError:
        return False
    return True


def _kill(event_id: str, point: str) -> None:
    journal(f"killed {event_id} {point}")
    os.kill(os.getpid(), signal.SIGKILL)


def credit(event: dict[str, Any]) -> dict[str, Any]:
    result = handlers.credit(event)
    event_id = str(event["eventId"])
    journal(f"applied {event_id}")
    if _fires(event_id, "inside"):
        _kill(event_id, "inside")
    if _fires(event_id, "after-commit"):
        transaction.on_commit(lambda: _kill(event_id, "after-commit"))
    return result
