"""Dead letters: record the messages that can never succeed as they are, and re-drive them.

:func:`record` is the last resort of a worker that could not process a message, so it never
raises: whatever it is given (a payload nested a thousand levels deep, objects whose ``repr``
raises, strings holding NUL bytes that PostgreSQL text refuses) becomes something the database
accepts, and when even that fails it returns ``None``. A caller that gets ``None`` has stored
nothing and must give the message back to the broker rather than drop it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import reprlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from django.core.serializers.json import DjangoJSONEncoder
from django.db import DEFAULT_DB_ALIAS, router, transaction

logger = logging.getLogger("idempotency")

INVALID_KEY = "invalid_key"
INVALID_EVENT = "invalid_event"
FAILED = "failed"
UNDECODABLE = "undecodable"
UNKNOWN_TASK = "unknown_task"
DELIVERY_LIMIT = "delivery_limit"
BROKER = "broker"

#: The longest text field kept (a body, an exception, a traceback); the rest is cut.
_MAX_TEXT = 64 * 1024
#: The largest JSON value (arguments, headers) kept as JSON; a larger one is kept as cut text.
_MAX_JSON = 8 * 1024 * 1024
#: The deepest JSON value kept as JSON: well inside Python's recursion limit, whatever the stack
#: depth of the caller, and deeper than any event the claim accepts (MAX_EVENT_DEPTH).
_MAX_DEPTH = 256

_repr = reprlib.Repr()
_repr.maxlevel = 8
_repr.maxstring = 2000
_repr.maxother = 2000
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = 200


def database() -> str:
    """The database dead letters are written to, as the project's routers decide."""
    from .models import DeadLetter

    return router.db_for_write(DeadLetter) or DEFAULT_DB_ALIAS


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
    """Store a dead letter in its own transaction; the row, or ``None`` if it was not stored.

    Never raises: the worker must go on, and the caller decides what a ``None`` means for the
    message (it goes back to the broker). What was not stored is logged at CRITICAL with
    everything needed to replay it by hand.
    """
    fields: dict[str, Any] = {}
    try:
        fields = _fields(
            reason=reason,
            task_name=task_name,
            task_id=task_id,
            event_id=event_id,
            args=args,
            kwargs=kwargs,
            body=body,
            headers=headers,
            exception=exception,
            traceback=traceback,
            attempts=attempts,
        )
        letter = _store(fields)
    # The last resort must not kill the worker whatever went wrong (a database error, a
    # driver's encoding error, a RecursionError): every failure means "not stored".
    except Exception:
        _log_not_stored(fields or {"reason": reason, "task_name": task_name, "task_id": task_id})
        return None
    # A log handler's failure is no reason to report the row as not stored.
    with contextlib.suppress(Exception):
        logger.error(
            "dead letter %s: %s %s (%s)",
            letter.pk,
            fields["task_name"] or "?",
            fields["event_id"],
            reason,
            extra={
                "consumer": fields["task_name"],
                "event_id": fields["event_id"],
                "dead_letter": letter.pk,
            },
        )
    return letter


def _fields(
    *,
    reason: str,
    task_name: str,
    task_id: str,
    event_id: str,
    args: Any,
    kwargs: Any,
    body: str,
    headers: dict[str, Any] | None,
    exception: BaseException | None,
    traceback: str,
    attempts: int,
) -> dict[str, Any]:
    stored_args, args_text = _json_field(args)
    stored_kwargs, kwargs_text = _json_field(kwargs)
    stored_headers, headers_text = _json_field(headers)
    text_body = _text(body, _MAX_TEXT)
    # What could not be kept as JSON is kept as text, so the letter still shows it.
    for label, text in (("args", args_text), ("kwargs", kwargs_text), ("headers", headers_text)):
        if text:
            text_body = _text(f"{text_body}\n{label}: {text}".lstrip(), _MAX_TEXT)
    try:
        count = max(1, int(attempts))
    except Exception:
        count = 1
    return {
        "reason": _text(reason, 16),
        "task_name": _text(task_name, 200),
        "task_id": _text(task_id, 255),
        "event_id": _text(event_id, 255),
        "args": stored_args,
        "kwargs": stored_kwargs,
        "body": text_body,
        "headers": stored_headers,
        "exception": _text(_safe_repr(exception), _MAX_TEXT) if exception is not None else "",
        "traceback": _text(traceback, _MAX_TEXT),
        "attempts": count,
    }


def _store(fields: dict[str, Any]) -> Any:
    from .models import DeadLetter

    using = database()
    with transaction.atomic(using=using):
        return DeadLetter.objects.using(using).create(**fields)


def _log_not_stored(fields: dict[str, Any]) -> None:
    with contextlib.suppress(Exception):
        logger.critical(
            "could not store a dead letter: %s", _safe_repr(fields, limit=_MAX_TEXT), exc_info=True
        )


def _text(value: Any, limit: int) -> str:
    """*value* as text PostgreSQL accepts (no NUL, no lone surrogate), at most *limit* long."""
    text = value if isinstance(value, str) else _safe_repr(value)
    return _clean(text)[:limit]


def _clean(text: str) -> str:
    # PostgreSQL text and jsonb refuse U+0000, and UTF-8 cannot encode a lone surrogate:
    # escape both, visibly, rather than lose the whole letter.
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def _safe_repr(value: Any, limit: int = _MAX_TEXT) -> str:
    """A bounded ``repr`` that survives deep nesting and a ``__repr__`` that raises."""
    try:
        text = _repr.repr(value)
    except Exception:
        try:
            text = f"<unrepresentable {type(value).__qualname__}>"
        except Exception:
            text = "<unrepresentable>"
    return text[:limit]


class _Unstorable(Exception):
    """The value cannot be kept as JSON (too deep, too large): it is kept as text instead."""


_encoder = DjangoJSONEncoder()


def _json_field(value: Any) -> tuple[Any, str]:
    """``(json value, "")`` for a JSONField, or ``(None, text)`` when it has no storable JSON.

    Tuples become lists, dates and decimals strings (as the task serializer sends them),
    non-finite floats strings (jsonb refuses NaN), any other object its repr.
    """
    if value is None:
        return None, ""
    try:
        clean = _jsonable(value, 0)
        size = len(json.dumps(clean, allow_nan=False, separators=(",", ":")))
        if size > _MAX_JSON:
            raise _Unstorable(f"{size} bytes")
        return clean, ""
    except Exception:
        return None, _safe_repr(value)


def _jsonable(value: Any, depth: int) -> Any:
    if depth > _MAX_DEPTH:
        raise _Unstorable("nested too deeply")
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, str):
        return _clean(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, dict):
        return {_key(key): _jsonable(item, depth + 1) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(item, depth + 1) for item in value]
    try:
        converted = _encoder.default(value)
    except Exception:
        return _clean(_safe_repr(value))
    return _jsonable(converted, depth + 1)


def _key(key: Any) -> str:
    if isinstance(key, str):
        return _clean(key)
    if key is None or isinstance(key, bool | int | float):
        return json.dumps(key)  # what json.dumps makes of a non-string key
    return _clean(_safe_repr(key))


def redrive(letters: Iterable[Any]) -> tuple[list[Any], list[Any]]:
    """Publish each re-drivable letter again, through the outbox; ``(re-driven, skipped)``.

    A re-driven event still passes through the inbox, so one that did get processed after all
    is discarded as a duplicate. Each letter's outbox row and its "re-driven" mark commit
    together, on the database the routers write both to.
    """
    from django.db.models import F
    from django.db.models.functions import Now

    from . import outbox
    from .models import DeadLetter

    using = database()
    done, skipped = [], []
    for letter in letters:
        if not letter.can_redrive:
            skipped.append(letter)
            continue
        with transaction.atomic(using=using):
            outbox.enqueue(
                letter.task_name, letter.args, letter.kwargs or {}, event_id=letter.event_id
            )
            DeadLetter.objects.using(using).filter(pk=letter.pk).update(
                redriven_at=Now(), redrive_count=F("redrive_count") + 1
            )
        letter.refresh_from_db(using=using, fields=["redriven_at", "redrive_count"])
        done.append(letter)
    return done, skipped


# --- Importing a broker's dead-letter queue ------------------------------------------------------


@dataclass
class BrokerImport:
    """What an import of a broker dead-letter queue did (or, in a dry run, would do)."""

    queue: str
    imported: int = 0
    skipped: int = 0
    #: True when a row could not be stored: the import stopped and the message stays queued.
    interrupted: bool = False
    letters: list[Any] = field(default_factory=list)


@dataclass(frozen=True)
class BrokerMessage:
    """A dead-lettered Celery message as the broker holds it, decoded for a DeadLetter row."""

    task_name: str
    task_id: str
    args: Any
    kwargs: Any
    body: str
    headers: dict[str, Any]
    deaths: int
    why: str


def dead_letter_queue_names(queues: Iterable[Any]) -> list[str]:
    """``<queue>.dead`` of each Celery queue that RabbitMQ dead-letters (see project.queues)."""
    names = []
    for queue in queues or ():
        arguments = getattr(queue, "queue_arguments", None) or {}
        if arguments.get("x-dead-letter-exchange") is not None:
            names.append(f"{queue.name}.dead")
    return names


def import_broker_queue(
    channel: Any,
    queue: str,
    *,
    accept: Iterable[str] | None = ("json",),
    limit: int | None = None,
    dry_run: bool = False,
    progress: Callable[[str, BrokerMessage], None] | None = None,
) -> BrokerImport:
    """Drain the RabbitMQ dead-letter queue *queue* into DeadLetter rows (reason ``broker``).

    Each message is acknowledged only once its row has committed, so an interrupted import
    loses nothing (a message acknowledged late is skipped next time). A message whose task id
    already has a dead letter (the worker stored one before rejecting it) is acknowledged
    without a new row. A dry run takes the messages and gives them all back unacknowledged.
    *progress* is called with ``"imported"``, ``"skipped"`` or ``"failed"`` and the message.
    """
    from kombu import Queue

    from .models import DeadLetter

    using = database()
    source = Queue(queue, no_declare=True).bind(channel)
    outcome = BrokerImport(queue=queue)
    taken = 0
    while limit is None or taken < limit:
        message = source.get(no_ack=False, accept=list(accept) if accept is not None else None)
        if message is None:
            break
        taken += 1
        decoded = decode_broker_message(message)
        known = bool(decoded.task_id) and (
            DeadLetter.objects.using(using).filter(task_id=decoded.task_id).exists()
        )
        if known:
            outcome.skipped += 1
            if not dry_run:
                message.ack()
            if progress:
                progress("skipped", decoded)
            continue
        if dry_run:
            outcome.imported += 1
            if progress:
                progress("imported", decoded)
            continue
        letter = record(
            reason=BROKER,
            task_name=decoded.task_name,
            task_id=decoded.task_id,
            event_id=_event_id_of(decoded),
            args=decoded.args,
            kwargs=decoded.kwargs,
            body=decoded.body,
            headers=decoded.headers,
            exception=_BrokerDeath(decoded.why),
            attempts=decoded.deaths,
        )
        if letter is None:
            # Not stored: leave it (and what follows) in the queue for the next import.
            outcome.interrupted = True
            if progress:
                progress("failed", decoded)
            break
        message.ack()
        outcome.imported += 1
        outcome.letters.append(letter)
        if progress:
            progress("imported", decoded)
    return outcome


class _BrokerDeath(Exception):
    """Why the broker dead-lettered a message, as its ``x-death`` header tells it."""

    def __repr__(self) -> str:
        return str(self)


def decode_broker_message(message: Any) -> BrokerMessage:
    """The task name, id, arguments and death record of a Celery message (protocol 2 or 1)."""
    headers = dict(message.headers or {})
    task_name = str(headers.get("task") or "")
    task_id = str(headers.get("id") or "")
    args: Any = None
    kwargs: Any = None
    body = ""
    try:
        payload = message.decode()
    except Exception as exc:  # undecodable or refused content: keep the raw body instead
        payload = None
        body = f"{_raw(message.body)}\n({exc!r})"
    if isinstance(payload, list | tuple) and len(payload) == 3:  # protocol 2
        args, kwargs = list(payload[0] or ()), dict(payload[1] or {})
    elif isinstance(payload, dict) and "task" in payload:  # protocol 1
        task_name = task_name or str(payload.get("task") or "")
        task_id = task_id or str(payload.get("id") or "")
        args, kwargs = list(payload.get("args") or ()), dict(payload.get("kwargs") or {})
    elif payload is not None:
        body = _raw(message.body)
    deaths, why = _deaths(headers)
    return BrokerMessage(task_name, task_id, args, kwargs, body, headers, deaths, why)


def _deaths(headers: dict[str, Any]) -> tuple[int, str]:
    records = headers.get("x-death")
    if not isinstance(records, list) or not records:
        return 1, "dead-lettered by the broker"
    count = 0
    parts = []
    for death in records:
        if not isinstance(death, dict):
            continue
        times = death.get("count")
        times = times if isinstance(times, int) else 1
        count += times
        parts.append(
            f"{death.get('reason', '?')} from queue {death.get('queue', '?')!s} ({times}x)"
        )
    return max(1, count), "dead-lettered by the broker: " + "; ".join(parts)


def _event_id_of(message: BrokerMessage) -> str:
    from celery import current_app

    from .celery import IdempotentTask

    if not message.args:
        return ""
    task = current_app.tasks.get(message.task_name)
    if isinstance(task, IdempotentTask):
        return task._event_id(message.args)
    try:
        from .conf import app_settings
        from .keys import extract_key

        return extract_key(message.args[0], app_settings.KEY)
    except Exception:  # not an event of ours: the row is kept without an event id
        return ""


def _raw(body: Any) -> str:
    if isinstance(body, bytes):
        return body.decode("utf-8", errors="replace")
    return str(body)
