"""Decorators for plain event handlers: a thin layer over :class:`idempotency.inbox.idempotent`."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import wraps
from typing import Any, TypeVar

from .conf import app_settings
from .inbox import idempotent
from .keys import KeySpec, extract_key

R = TypeVar("R")


def run_once(
    consumer: str,
    event: Any,
    handler: Callable[[], R],
    *,
    key: KeySpec | None = None,
    on_mismatch: str | None = None,
    store_result: bool | None = None,
    result_serializer: Callable[[Any], Any] | None = None,
    allow_writes_to: Iterable[str] = (),
    using: str | None = None,
) -> R:
    """Call *handler* unless *consumer* already processed *event*; return its (stored) result.

    A first delivery returns what *handler* returned; a duplicate returns the stored JSON form
    of it (after *result_serializer*, if given). See :class:`idempotency.inbox.idempotent`.
    """
    event_id = extract_key(event, key if key is not None else app_settings.KEY)
    with idempotent(
        consumer,
        event_id,
        payload=event,
        on_mismatch=on_mismatch,
        store_result=store_result,
        result_serializer=result_serializer,
        allow_writes_to=allow_writes_to,
        using=using,
    ) as claim:
        if claim.duplicate:
            result: R = claim.result
            return result
        claim.result = handler()
    return claim.result


def idempotent_handler(
    consumer: str | None = None,
    *,
    key: KeySpec | None = None,
    on_mismatch: str | None = None,
    store_result: bool | None = None,
    result_serializer: Callable[[Any], Any] | None = None,
    allow_writes_to: Iterable[str] = (),
    using: str | None = None,
) -> Callable[[Callable[..., R]], Callable[..., R]]:
    """Make ``handler(event, ...)`` apply each event once.

    The consumer name defaults to the handler's dotted path; set it explicitly if the function
    may move, since a new name forgets what the old one processed.
    """

    def decorate(func: Callable[..., R]) -> Callable[..., R]:
        name = consumer or f"{func.__module__}.{func.__qualname__}"

        @wraps(func)
        def wrapper(event: Any, *args: Any, **kwargs: Any) -> R:
            return run_once(
                name,
                event,
                lambda: func(event, *args, **kwargs),
                key=key,
                on_mismatch=on_mismatch,
                store_result=store_result,
                result_serializer=result_serializer,
                allow_writes_to=allow_writes_to,
                using=using,
            )

        return wrapper

    return decorate
