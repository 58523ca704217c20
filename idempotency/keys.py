"""Turn an event into its idempotency key.

A key spec is one of:

* a dotted path into the event, ``"eventId"`` or ``"meta.id"``;
* a sequence of paths, a composite business key such as ``("orderId", "paymentId")``;
* a callable taking the event and returning the key.

A composite key built from business data stops matching when that data legitimately changes
(a corrected amount is then a "new" event): prefer a producer-assigned id where one exists.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .exceptions import IdempotencyConfigurationError, InvalidEventId, MissingEventId

KeySpec = str | Sequence[str] | Callable[[Any], Any]

#: Separates the parts of a composite key; chosen because ids rarely contain it.
COMPOSITE_SEPARATOR = "|"
MAX_KEY_LENGTH = 255


def _lookup(event: Any, path: str) -> Any:
    value = event
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            raise MissingEventId(f"the event has no {path!r} field")
        value = value[part]
    return value


def _as_key_part(value: Any, what: str) -> str:
    if value is None:
        raise MissingEventId(f"{what} is null")
    if isinstance(value, (dict, list, tuple, set, bool)):
        raise InvalidEventId(f"{what} must be a string or a number, not {value!r}")
    text = str(value).strip()
    if not text:
        raise MissingEventId(f"{what} is empty")
    return text


def extract_key(event: Any, spec: KeySpec) -> str:
    """The idempotency key of *event* according to *spec*; raises :class:`MissingEventId`."""
    if callable(spec):
        key = _as_key_part(spec(event), "the key returned by the key function")
    elif isinstance(spec, str):
        key = _as_key_part(_lookup(event, spec), repr(spec))
    elif isinstance(spec, Sequence) and spec and all(isinstance(p, str) for p in spec):
        key = COMPOSITE_SEPARATOR.join(_as_key_part(_lookup(event, p), repr(p)) for p in spec)
    else:
        raise IdempotencyConfigurationError(
            f"a key must be a field path, a sequence of field paths or a callable, not {spec!r}"
        )
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidEventId(f"the key is {len(key)} characters long; at most {MAX_KEY_LENGTH}")
    return key
