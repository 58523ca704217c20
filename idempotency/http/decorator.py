"""``@idempotent_request``: run a DRF view handler once per ``Idempotency-Key``."""

from __future__ import annotations

# The drf extra: without it, say which to install rather than fail on a bare import.
try:
    import rest_framework  # noqa: F401
except ImportError as _exc:
    from ..extras import missing

    raise missing("drf", "idempotency.http") from _exc

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import wraps
from typing import Any, TypeVar

from django.db import (
    DEFAULT_DB_ALIAS,
    router,
    transaction,
)
from django.http.response import HttpResponseBase
from django.utils import timezone
from rest_framework.request import Request
from rest_framework.views import APIView

from ..exceptions import (
    IdempotencyKeyInUse,
    IdempotencyKeyReused,
    InvalidIdempotencyKey,
    MissingIdempotencyKey,
)
from . import handshake
from .models import IdempotencyKey, KeyState
from .responses import SAFE_REPLAY_HEADERS, _in_use, _invalid, _missing, _reused, replay
from .scope import (
    HEADER,
    KeyScope,
    default_owner,
    endpoint_of,
    owner_of,
    parse_key,
    request_fingerprint,
)

#: How often a request starts over when the key row vanished under it (released or purged).
_MAX_ATTEMPTS = 3

V = TypeVar("V", bound=APIView)
Handler = Callable[..., HttpResponseBase]


@dataclass(frozen=True)
class _Options:
    required: bool
    owner: Callable[[Request], str]
    replay_headers: tuple[str, ...]
    using: str | None


def _render(
    view: APIView, request: Request, handler: Handler, args: Any, kwargs: Any
) -> HttpResponseBase:
    """The view's final response, rendered, including the 4xx its exceptions become."""
    try:
        response = handler(view, request, *args, **kwargs)
    except Exception as exc:
        # REST framework's own handling, done here rather than in dispatch() so an error
        # response is stored too; whatever it does not handle (a 500) is re-raised.
        response = view.handle_exception(exc)
    # finalize_response() accepts any HttpResponseBase; the stubs say Response.
    response = view.finalize_response(request, response, *args, **kwargs)  # type: ignore[arg-type]
    render = getattr(response, "render", None)
    if callable(render):
        response = render()
    return response


def _run(
    view: APIView,
    request: Request,
    handler: Handler,
    args: Any,
    kwargs: Any,
    record: IdempotencyKey,
    created: bool,
    fingerprint: str,
    options: _Options,
    using: str,
) -> HttpResponseBase | None:
    """Run the view under the key's row lock; ``None`` when the record vanished (start over)."""
    # A request that created the marker answers for it from the start: if the database fails
    # before the lock is taken, the marker must still be released.
    owned, stored = created, False
    try:
        with transaction.atomic(using=using):
            try:
                row = handshake._lock(record, using)
            except IdempotencyKeyInUse:
                owned = False  # a retry took the marker over before this request locked it
                raise
            if row is None:
                owned = False
                return None
            handshake._check_reuse(row, fingerprint)
            if row.state == KeyState.COMPLETED:
                owned = False
                return replay(row)
            if not created:
                if not handshake._takeable(row, using):
                    # A marker nobody holds: a request about to lock it, or a dead one's.
                    raise IdempotencyKeyInUse(
                        row.key, handshake._unheld_retry_after(row, handshake._seconds_left(row))
                    )
                row.locked_until = timezone.now() + handshake._lease()
                row.save(using=using, update_fields=["locked_until"])
            owned = True
            response = _render(view, request, handler, args, kwargs)
            keep = response.status_code < 500 and not transaction.get_rollback(using=using)
            if keep:
                handshake._complete(row, response, options.replay_headers, using)
            else:
                # Neither the effect nor the key: the client retries from a clean slate.
                transaction.set_rollback(True, using=using)
        stored = keep
        return response
    finally:
        if owned and not stored:
            handshake._release(record, using)


def _respond(
    view: APIView,
    request: Request,
    handler: Handler,
    args: Any,
    kwargs: Any,
    options: _Options,
) -> HttpResponseBase:
    key = parse_key(request.headers.get(HEADER))
    if key is None:
        if options.required:
            raise MissingIdempotencyKey(
                f"this endpoint requires an {HEADER} header (a unique value per request)"
            )
        return handler(view, request, *args, **kwargs)
    scope = KeyScope(owner_of(request, options.owner), endpoint_of(request), key)
    request.idempotency_scope = scope  # type: ignore[attr-defined]
    fingerprint = request_fingerprint(request)
    using = options.using or router.db_for_write(IdempotencyKey) or DEFAULT_DB_ALIAS
    for _attempt in range(_MAX_ATTEMPTS):
        claimed = handshake._claim(scope, fingerprint, using)
        if claimed is None:
            continue
        record, created = claimed
        if not created:
            # Final states need no lock: a completed record never changes.
            handshake._check_reuse(record, fingerprint)
            if record.state == KeyState.COMPLETED:
                return replay(record)
        response = _run(
            view, request, handler, args, kwargs, record, created, fingerprint, options, using
        )
        if response is not None:
            return response
    raise IdempotencyKeyInUse(key, retry_after=1)


def idempotent_request(
    func: Handler | None = None,
    *,
    required: bool = False,
    owner: Callable[[Request], str] = default_owner,
    replay_headers: Iterable[str] = SAFE_REPLAY_HEADERS,
    using: str | None = None,
) -> Any:
    """Make a DRF view handler (``post``, ``patch``) honour the ``Idempotency-Key`` header.

    ``required=True`` answers 400 to a request without the header; otherwise such a request
    runs as usual. *owner* maps a request to whom its keys belong (default: the authenticated
    user; an anonymous request is refused). *replay_headers* are the response headers stored
    and replayed. The handler's writes must go to the key table's database (*using*), so that
    they commit together with the stored response.
    """
    options = _Options(required, owner, tuple(replay_headers), using)

    def decorate(handler: Handler) -> Handler:
        @wraps(handler)
        def wrapper(view: APIView, request: Request, *args: Any, **kwargs: Any) -> Any:
            try:
                return _respond(view, request, handler, args, kwargs, options)
            except MissingIdempotencyKey as exc:
                return _missing(exc)
            except InvalidIdempotencyKey as exc:
                return _invalid(exc)
            except IdempotencyKeyReused as exc:
                return _reused(exc)
            except IdempotencyKeyInUse as exc:
                return _in_use(exc)

        return wrapper

    return decorate(func) if func is not None else decorate
