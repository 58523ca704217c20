"""Recording a dead letter: a message that can never succeed as it is.

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
