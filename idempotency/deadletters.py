"""Dead letters: record the messages that can never succeed as they are, and re-drive them."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from django.db import DatabaseError, transaction
from django.utils import timezone

logger = logging.getLogger("idempotency")

INVALID_KEY = "invalid_key"
FAILED = "failed"
UNDECODABLE = "undecodable"
UNKNOWN_TASK = "unknown_task"

_MAX_TEXT = 64 * 1024


def record(
    *,
    reason: str,
    task_name: str = "",
    task_id: str = "",
    event_id: str = "",
    args: Any = None,
    kwargs: Any = None,
    body: str = "",
    headers: dict[str, Any] | None = None,
    exception: BaseException | None = None,
    traceback: str = "",
    attempts: int = 1,
) -> Any:
    """Store a dead letter in its own transaction; never raises (the worker must go on).

    If the database refuses it, the message is logged at CRITICAL with everything needed to
    replay it by hand.
    """
    from .models import DeadLetter

    fields = {
        "reason": reason,
        "task_name": task_name,
        "task_id": task_id,
        "event_id": event_id[:255],
        "args": _jsonable(args),
        "kwargs": _jsonable(kwargs),
        "body": body[:_MAX_TEXT],
        "headers": _jsonable(headers),
        "exception": repr(exception)[:_MAX_TEXT] if exception else "",
        "traceback": traceback[:_MAX_TEXT],
        "attempts": attempts,
    }
    try:
        with transaction.atomic(using=DeadLetter.objects.db):
            letter = DeadLetter.objects.create(**fields)
    except DatabaseError:
        logger.critical("could not store a dead letter: %r", fields, exc_info=True)
        return None
    logger.error(
        "dead letter %s: %s %s (%s)",
        letter.pk,
        task_name or "?",
        event_id,
        reason,
        extra={"consumer": task_name, "event_id": event_id, "dead_letter": letter.pk},
    )
    return letter


def redrive(letters: Iterable[Any]) -> tuple[list[Any], list[Any]]:
    """Publish each re-drivable letter again, through the outbox; ``(re-driven, skipped)``.

    A re-driven event still passes through the inbox, so one that did get processed after all
    is discarded as a duplicate.
    """
    from . import outbox

    done, skipped = [], []
    for letter in letters:
        if not letter.can_redrive:
            skipped.append(letter)
            continue
        with transaction.atomic():
            outbox.enqueue(
                letter.task_name, letter.args, letter.kwargs or {}, event_id=letter.event_id
            )
            letter.redriven_at = timezone.now()
            letter.redrive_count += 1
            letter.save(update_fields=["redriven_at", "redrive_count"])
        done.append(letter)
    return done, skipped


def _jsonable(value: Any) -> Any:
    """The value as it can be stored in a JSONField (tuples become lists, the rest a repr)."""
    import json

    from django.core.serializers.json import DjangoJSONEncoder

    if value is None:
        return None
    try:
        return json.loads(json.dumps(value, cls=DjangoJSONEncoder))
    except (TypeError, ValueError):
        return repr(value)
