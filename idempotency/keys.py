"""Turn an event into its idempotency key.

A key spec is one of:

* a dotted path into the event, ``"eventId"`` or ``"meta.id"``;
* a sequence of paths, a composite business key such as ``("orderId", "paymentId")``;
* a callable taking the event and returning the key.

A single key (a path or a callable's result) is stripped of surrounding white space, as it always
was. The parts of a composite key are kept exactly as they are and joined with ``|``; a ``|`` or
``\\`` inside a part is escaped with ``\\``, so two different tuples never give the same key.

A composite key built from business data stops matching when that data legitimately changes
(a corrected amount is then a "new" event): prefer a producer-assigned id where one exists.
"""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal
from typing import Any

from .exceptions import (
    IdempotencyConfigurationError,
    InvalidConsumerName,
    InvalidEventId,
    MissingEventId,
)

KeySpec = str | Sequence[str] | Callable[[Any], Any]

#: Separates the parts of a composite key; a separator or escape inside a part is escaped.
COMPOSITE_SEPARATOR = "|"
COMPOSITE_ESCAPE = "\\"
MAX_KEY_LENGTH = 255

#: C0 control characters and DEL (PostgreSQL text refuses NUL, and none belongs in an id), and
#: lone surrogates, which have no UTF-8 form: no database driver can send them.
_CONTROL = re.compile(r"[\x00-\x1f\x7f\ud800-\udfff]")

#: An integer with more bits than this has more than MAX_KEY_LENGTH digits; refused before
#: str() (which itself refuses past 4300 digits with a bare ValueError).
_MAX_INT_BITS = math.ceil(MAX_KEY_LENGTH * math.log2(10))


def _lookup(event: Any, path: str) -> Any:
    value = event
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            raise MissingEventId(f"the event has no {path!r} field")
        value = value[part]
    return value


def _as_text(value: Any, what: str) -> str:
    """*value* as the text of a key, or the reason it cannot be one."""
    if isinstance(value, str):
        return value
    if value is None:
        raise MissingEventId(f"{what} is null")
    if isinstance(value, bool):  # before int: True is an int, but never an id
        raise InvalidEventId(f"{what} must be a string or a number, not {value!r}")
    if isinstance(value, int):
        if value.bit_length() > _MAX_INT_BITS:
            raise InvalidEventId(f"{what} is a number longer than {MAX_KEY_LENGTH} digits")
        return str(value)
    if isinstance(value, (float, Decimal)):
        # Decimal's own test: math.isfinite() raises ValueError on a signalling NaN.
        finite = value.is_finite() if isinstance(value, Decimal) else math.isfinite(value)
        if not finite:
            raise InvalidEventId(f"{what} must be a finite number, not {value!r}")
        return str(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    raise InvalidEventId(
        f"{what} must be a string, a number or a UUID, not {type(value).__name__} {value!r:.80}"
    )


def _checked(text: str, what: str) -> str:
    if not text or text.isspace():
        raise MissingEventId(f"{what} is empty")
    if len(text) > MAX_KEY_LENGTH:
        raise InvalidEventId(f"{what} is {len(text)} characters long; at most {MAX_KEY_LENGTH}")
    # isprintable() is a quick C scan that passes nearly every id; only the rest get the regex.
    control = None if text.isprintable() else _CONTROL.search(text)
    if control is not None:
        kind = "lone surrogate" if control.group() >= "\ud800" else "control character"
        raise InvalidEventId(f"{what} contains the {kind} {control.group()!r} at {control.start()}")
    return text


def event_id_key(value: Any, what: str = "the event id") -> str:
    """An event id passed directly (to ``idempotent`` or ``claim``), validated, never altered.

    Strings are used exactly as given; integers, finite floats, decimals and UUIDs as their
    ``str()``. Raises :class:`MissingEventId` for ``None``, ``""`` or white space only, and
    :class:`InvalidEventId` for anything else no stored key can hold (a control character, more
    than :data:`MAX_KEY_LENGTH` characters, a boolean, NaN, a container).
    """
    return _checked(_as_text(value, what), what)


#: The inbox's ``consumer`` column holds this many characters.
MAX_CONSUMER_LENGTH = 200

#: Names already found valid: a claim runs per event, its consumer is nearly always one of a
#: handful of names, so after the first claim the check is one set lookup. Bounded, so names
#: built per event (a misuse, but possible) cannot grow it without limit.
_valid_consumers: set[str] = set()
_MAX_REMEMBERED_CONSUMERS = 1024

#: NUL (PostgreSQL text refuses it) and lone surrogates (no UTF-8 form): no database stores them.
_UNSTORABLE = re.compile(r"[\x00\ud800-\udfff]")


def consumer_name(value: Any) -> str:
    """*value* as a consumer name, validated, never altered.

    Raises :class:`InvalidConsumerName` (an :class:`IdempotencyConfigurationError`) for a
    value that is not a string, is empty, is longer than :data:`MAX_CONSUMER_LENGTH`, or
    holds a NUL or a lone surrogate, before any query reaches the database.
    """
    # type() is str first: an unhashable value (a list) must not reach the set lookup.
    if type(value) is str and value in _valid_consumers:
        return value
    if not isinstance(value, str):
        raise InvalidConsumerName(
            f"a consumer name must be a string, not {type(value).__name__} {value!r:.80}"
        )
    if not value:
        raise InvalidConsumerName("a consumer name is required")
    if len(value) > MAX_CONSUMER_LENGTH:
        raise InvalidConsumerName(
            f"a consumer name is at most {MAX_CONSUMER_LENGTH} characters, "
            f"not {len(value)}: {value[:40]!r}..."
        )
    bad = _UNSTORABLE.search(value)
    if bad is not None:
        kind = "a NUL" if bad.group() == "\x00" else "the lone surrogate " + repr(bad.group())
        raise InvalidConsumerName(
            f"a consumer name cannot hold {kind} (at {bad.start()}): {value[:80]!r}"
        )
    if type(value) is str and len(_valid_consumers) < _MAX_REMEMBERED_CONSUMERS:
        _valid_consumers.add(value)
    return value


def _single(value: Any, what: str) -> str:
    return _checked(_as_text(value, what).strip(), what)


def _part(value: Any, what: str) -> str:
    text = _checked(_as_text(value, what), what)
    if COMPOSITE_ESCAPE in text:
        text = text.replace(COMPOSITE_ESCAPE, COMPOSITE_ESCAPE * 2)
    if COMPOSITE_SEPARATOR in text:
        text = text.replace(COMPOSITE_SEPARATOR, COMPOSITE_ESCAPE + COMPOSITE_SEPARATOR)
    return text


def _joined(parts: list[str]) -> str:
    key = COMPOSITE_SEPARATOR.join(parts)
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidEventId(f"the key is {len(key)} characters long; at most {MAX_KEY_LENGTH}")
    return key


def composite_key(parts: Sequence[Any]) -> str:
    """The key of a composite, as ``extract_key`` builds it from a sequence of paths: each part
    escaped, joined with :data:`COMPOSITE_SEPARATOR` (for data migrations of stored keys).
    """
    return _joined([_part(value, f"part {i}") for i, value in enumerate(parts)])


def extract_key(event: Any, spec: KeySpec) -> str:
    """The idempotency key of *event* according to *spec*.

    Raises :class:`MissingEventId` when the key is absent, and :class:`InvalidEventId` when it
    cannot be used (see :func:`event_id_key`).
    """
    if callable(spec):
        return _single(spec(event), "the key returned by the key function")
    if isinstance(spec, str):
        return _single(_lookup(event, spec), repr(spec))
    if isinstance(spec, Sequence) and spec and all(isinstance(p, str) for p in spec):
        return _joined([_part(_lookup(event, p), repr(p)) for p in spec])
    raise IdempotencyConfigurationError(
        f"a key must be a field path, a sequence of field paths or a callable, not {spec!r}"
    )
