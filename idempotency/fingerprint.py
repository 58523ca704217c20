"""A stable hash of an event's payload, to tell a true duplicate from a reused id."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import sys
from typing import Any

from django.core.serializers.json import DjangoJSONEncoder

from .conf import app_settings
from .exceptions import InvalidEvent


class EventJSONEncoder(DjangoJSONEncoder):
    """Django's encoder (dates, decimals, UUIDs, lazy strings), plus dataclass instances and
    pydantic models, so an event may be a typed object rather than a dict.
    """

    def default(self, o: Any) -> Any:
        if dataclasses.is_dataclass(o) and not isinstance(o, type):
            return dataclasses.asdict(o)
        pydantic = sys.modules.get("pydantic")  # never imported here: only if the project uses it
        if pydantic is not None and isinstance(o, pydantic.BaseModel):
            return o.model_dump(mode="json")
        return super().default(o)


def canonical_json(payload: Any) -> str:
    """The payload as JSON with sorted keys and no insignificant white space."""
    return json.dumps(
        payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False, cls=EventJSONEncoder
    )


def fingerprint(payload: Any) -> str:
    """The SHA-256 of :func:`canonical_json`, as 64 hex characters."""
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()


_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")


def digest_hex(value: Any) -> str:
    """*value* as the inbox stores a fingerprint: ``""`` (none) or a SHA-256 digest as 64 hex
    characters, lower-cased (the stored form is its 32 raw bytes, read back lower-case).

    Anything else raises :class:`InvalidEvent`: a fingerprint of another shape (a version tag,
    another hash) cannot be stored; pass :func:`fingerprint` of it instead.
    """
    if isinstance(value, str):
        if not value:
            return value
        lowered = value.lower()
        if _HEX_DIGEST.fullmatch(lowered):
            return lowered
    raise InvalidEvent(
        f"a fingerprint is a SHA-256 digest as 64 hex characters (or empty), not {value!r:.80}; "
        "pass idempotency.fingerprint.fingerprint(...) of the value instead"
    )


#: A JSON string (with its escapes), what is not a bracket, and an empty array or object.
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_EMPTY_PAIR = re.compile(r"\[\]|\{\}")


def nested_deeper(document: str, max_depth: int) -> bool:
    """Whether the arrays and objects of the JSON *document* nest deeper than *max_depth*.

    Without recursion or a loop per character: the strings and scalars are dropped, then each
    pass deletes every innermost ``[]``/``{}``, which lowers the deepest nesting by exactly one.
    """
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", document))
    for _ in range(max_depth):
        if not brackets:
            return False
        brackets = _EMPTY_PAIR.sub("", brackets)
    return bool(brackets)


def bounded_canonical_json(payload: Any, *, max_depth: int, max_bytes: int) -> bytes:
    """:func:`canonical_json` as UTF-8, or :class:`InvalidEvent` if the payload is nested deeper
    than *max_depth*, larger than *max_bytes*, circular, or holds a value with no JSON form.
    """
    try:
        document = canonical_json(payload)
    except RecursionError:
        raise InvalidEvent(
            f"the event is nested deeper than MAX_EVENT_DEPTH ({max_depth})"
        ) from None
    except (TypeError, ValueError) as exc:  # no JSON form; ValueError: a circular reference
        raise InvalidEvent(f"the event has no JSON form: {exc}") from exc
    try:
        encoded = document.encode()
    except UnicodeEncodeError as exc:  # a lone surrogate: no UTF-8 form, so none in JSON either
        raise InvalidEvent(f"the event has no JSON form: {exc}") from exc
    if len(encoded) > max_bytes:
        raise InvalidEvent(
            f"the event is {len(encoded)} bytes as canonical JSON; MAX_EVENT_BYTES is {max_bytes}"
        )
    # Nesting needs at least one bracket per level: a document with few brackets (the usual
    # event) is shallow enough without walking it.
    if encoded.count(b"[") + encoded.count(b"{") > max_depth and nested_deeper(document, max_depth):
        raise InvalidEvent(f"the event is nested deeper than MAX_EVENT_DEPTH ({max_depth})")
    return encoded


#: ``\u0000`` as JSON writes a NUL, not preceded by an escaping backslash.
_ESCAPED_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


def has_escaped_nul(document: str) -> bool:
    """Whether the JSON *document* holds a NUL character (``\\u0000``) in a string."""
    return "\\u0000" in document and _ESCAPED_NUL.search(document) is not None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def stored_json(document: str | bytes, what: str) -> Any:
    """The value of the JSON *document*, as every backend's JSON column can store it.

    Raises ``ValueError`` naming *what* for ``NaN``/``Infinity`` (not JSON: PostgreSQL's jsonb and
    SQLite's JSON_VALID check refuse them) and for a NUL character (``\\u0000``, which jsonb
    refuses), whatever the backend, so a project tested on SQLite fails alike on PostgreSQL.
    """
    text = document.decode() if isinstance(document, bytes) else document
    if has_escaped_nul(text):
        raise ValueError(f"{what} holds a NUL character (\\u0000), which PostgreSQL cannot store")
    return json.loads(text, parse_constant=_refuse_constant)


def event_fingerprint(payload: Any) -> str:
    """:func:`fingerprint` of an event, within ``MAX_EVENT_DEPTH`` and ``MAX_EVENT_BYTES``.

    Raises :class:`InvalidEvent` (never ``RecursionError`` or ``TypeError``) for an event that
    no attempt could process.
    """
    encoded = bounded_canonical_json(
        payload, max_depth=app_settings.MAX_EVENT_DEPTH, max_bytes=app_settings.MAX_EVENT_BYTES
    )
    return sha256_hex(encoded)


def sha256_hex(encoded: bytes) -> str:
    return hashlib.sha256(encoded).hexdigest()
