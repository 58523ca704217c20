"""The HTTP ``Idempotency-Key`` request header for Django REST framework views.

Decorate a view's handler::

    class PaymentView(APIView):
        @idempotent_request(required=True)
        def post(self, request: Request) -> Response:
            ...

A key is scoped to its owner (the authenticated user) and endpoint (method and URL route). The
first request with a key runs; its response is stored in the same transaction as the view's
writes and replayed, with ``Idempotent-Replayed: true``, to every retry with the same request.
A retry with another request gets 422, one arriving while the first is still running gets 409
with ``Retry-After``, and a missing (when required) or malformed key gets 400; these errors are
``application/problem+json`` documents (RFC 9457).

How a request in flight is recognised without waiting for it:

1. The key row is committed at once as an "in progress" marker with a lease
   (``HTTP_LEASE``), in its own short transaction, so a concurrent request sees it at once
   instead of blocking on the unique index behind an uncommitted insert.
2. The view's transaction starts by locking that row with ``SELECT ... FOR UPDATE NOWAIT``
   and holds the lock until it commits the response. A retry whose lock attempt fails knows a
   live request owns the key: 409, without waiting. Its process dying ends its transaction and
   the lock with it.
3. A retry that gets the lock but finds the row still "in progress" found the marker of a
   request that ended without releasing it (it died, or lost its database), or of one about to
   take the lock. On a database with row locks, a marker older than the few statements between
   its commit and its lock (``CLAIM_WINDOW``) has no live owner: the retry takes it over at
   once. A younger one answers 409 with ``Retry-After: 1``.

SQLite has no row locks but a single writer: with ``transaction_mode="IMMEDIATE"`` a retry
waits for the first request's transaction, then replays its response; otherwise the lease
(``HTTP_LEASE``) answers it, and only then is the key taken over. A 5xx response or an
exception rolls the view's writes back and releases the key, so the client can retry; the
release is retried for about two seconds when the database is what failed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from functools import wraps
from typing import Any, TypeVar

from django.core.files.uploadedfile import UploadedFile
from django.db import (
    DEFAULT_DB_ALIAS,
    DatabaseError,
    Error,
    IntegrityError,
    connections,
    router,
    transaction,
)
from django.db.models.functions import Now
from django.http import HttpResponse
from django.http.response import HttpResponseBase
from django.utils import timezone
from django.utils.datastructures import MultiValueDict
from rest_framework.exceptions import NotAuthenticated
from rest_framework.request import Request
from rest_framework.views import APIView

from .conf import app_settings
from .exceptions import (
    IdempotencyConfigurationError,
    IdempotencyKeyInUse,
    IdempotencyKeyReused,
    InvalidIdempotencyKey,
    MissingIdempotencyKey,
)
from .fingerprint import canonical_json, fingerprint
from .models import IdempotencyKey, KeyState

logger = logging.getLogger("idempotency")

HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
MAX_KEY_LENGTH = 255
PROBLEM_CONTENT_TYPE = "application/problem+json"
#: The ``type`` of each problem document is this prefix and a stable name (see docs/http.md).
PROBLEM_TYPE_PREFIX = "urn:django-idempotency:problem:"

#: Response headers stored and replayed. Others (``Set-Cookie``, tracing ids) describe the
#: first exchange, not the result, and may be secret.
SAFE_REPLAY_HEADERS = (
    "Content-Type",
    "Content-Language",
    "Content-Location",
    "Location",
    "Link",
    "ETag",
    "Last-Modified",
)

#: How often a request starts over when the key row vanished under it (released or purged).
_MAX_ATTEMPTS = 3

#: Far longer than the few statements between a marker's commit and its owner's row lock. An
#: unlocked marker this old has no live owner; taking over a younger one would be safe too (its
#: owner then fails to lock it and answers 409), only less polite.
CLAIM_WINDOW = timedelta(seconds=2)

#: Pauses before each attempt to release a key after a failure, about two seconds in all: long
#: enough to outlast a connection reset or a fail-over blip, short enough for a request thread.
_RELEASE_PAUSES = (0.0, 0.25, 0.5, 1.0)
_RELEASE_BUDGET = 2.0

V = TypeVar("V", bound=APIView)
Handler = Callable[..., HttpResponseBase]


@dataclass(frozen=True)
class KeyScope:
    """Whose key it is and where it was used: the unique identity of a key record."""

    owner: str
    endpoint: str
    key: str


# --- Reading the request --------------------------------------------------------------------


def parse_key(value: str | None) -> str | None:
    """The key in an ``Idempotency-Key`` header value, or ``None`` when there is no header.

    The draft makes the value a Structured Field string (``"abc"``); a bare token (``abc``), as
    most clients send, is accepted too. Raises :class:`InvalidIdempotencyKey`.
    """
    if value is None:
        return None
    key = value.strip()
    if len(key) >= 2 and key[0] == key[-1] == '"':
        key = key[1:-1].replace('\\"', '"').replace("\\\\", "\\")
    if not key:
        raise InvalidIdempotencyKey("the Idempotency-Key header is empty")
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidIdempotencyKey(
            f"the Idempotency-Key is {len(key)} characters long; at most {MAX_KEY_LENGTH}"
        )
    if not all("!" <= char <= "~" for char in key):
        raise InvalidIdempotencyKey(
            "the Idempotency-Key may contain only visible ASCII characters (no spaces)"
        )
    return key


def default_owner(request: Request) -> str:
    """The authenticated user: keys of different users never meet."""
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        # A key shared by every anonymous client would replay one client's response to another.
        raise NotAuthenticated("An Idempotency-Key needs an authenticated client.")
    return f"user:{user.pk}"


def endpoint_of(request: Request) -> str:
    """The method and the URL route (the pattern, so ``/orders/1/`` and ``/orders/2/`` share).

    Past 255 characters the tail is replaced by the SHA-256 of the whole: still unique.
    """
    match = getattr(request, "resolver_match", None)
    route = getattr(match, "route", None) or request.path_info
    return IdempotencyKey.stored_endpoint(f"{request.method} {route}")


def owner_of(request: Request, owner: Callable[[Request], str]) -> str:
    """What *owner* returns for *request*, as stored: past 150 characters, hashed like an
    endpoint (stable, so every retry finds its key, and unique)."""
    value = owner(request)
    if not isinstance(value, str):
        raise IdempotencyConfigurationError(
            f"the owner function {owner!r} must return a string, not {value!r}"
        )
    return IdempotencyKey.stored_owner(value)


def _canonical(value: Any) -> Any:
    """Parsed request data as plain JSON values; form data and uploads have no JSON form."""
    if isinstance(value, MultiValueDict):
        return {name: [_canonical(v) for v in value.getlist(name)] for name in value}
    if isinstance(value, UploadedFile):
        return {"file": value.name, "size": value.size, "contentType": value.content_type}
    if isinstance(value, Mapping):
        return {str(name): _canonical(v) for name, v in value.items()}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    return value


def request_fingerprint(request: Request) -> str:
    """SHA-256 of the method, the path with its query and the canonical body.

    The body is compared as parsed data, so key order and white space do not make a retry a
    different request.
    """
    payload = {
        "method": request.method,
        "path": request.get_full_path(),
        "body": _canonical(request.data),
    }
    try:
        return fingerprint(payload)
    except UnicodeEncodeError:
        # A lone surrogate (a JSON "\ud800" escape) has no UTF-8 form; whether the request is
        # valid is the view's to say, and its retries must still hash alike.
        text = canonical_json(payload).encode("utf-8", "surrogatepass")
        return hashlib.sha256(text).hexdigest()


def current_scope(request: Request) -> KeyScope | None:
    """The key of the request being handled by an :func:`idempotent_request` view, if any."""
    scope: KeyScope | None = getattr(request, "idempotency_scope", None)
    return scope


# --- Responses ------------------------------------------------------------------------------


def problem(
    status: int, name: str, title: str, detail: str, headers: Mapping[str, str] | None = None
) -> HttpResponse:
    """An RFC 9457 problem document."""
    body = {"type": PROBLEM_TYPE_PREFIX + name, "title": title, "status": status, "detail": detail}
    response = HttpResponse(json.dumps(body), status=status, content_type=PROBLEM_CONTENT_TYPE)
    for header, value in (headers or {}).items():
        response[header] = value
    return response


def _missing(exc: MissingIdempotencyKey) -> HttpResponse:
    return problem(400, "idempotency-key-missing", "Idempotency-Key required", str(exc))


def _invalid(exc: InvalidIdempotencyKey) -> HttpResponse:
    return problem(400, "idempotency-key-invalid", "Invalid Idempotency-Key", str(exc))


def _in_use(exc: IdempotencyKeyInUse) -> HttpResponse:
    return problem(
        409,
        "idempotency-key-in-use",
        "Request in progress",
        "A request with this Idempotency-Key is still being processed; retry later.",
        headers={"Retry-After": str(exc.retry_after)},
    )


def _reused(exc: IdempotencyKeyReused) -> HttpResponse:
    return problem(
        422,
        "idempotency-key-reused",
        "Idempotency-Key reused",
        "This Idempotency-Key was already used for a different request (method, path or "
        "body). Use a new key for a new request.",
    )


def replay(record: IdempotencyKey) -> HttpResponse:
    """The stored response again, marked as a replay."""
    assert record.response_status is not None
    response = HttpResponse(bytes(record.response_body), status=record.response_status)
    if "Content-Type" not in record.response_headers:
        del response["Content-Type"]  # HttpResponse's default was not part of the original
    for name, value in record.response_headers.items():
        response[name] = value
    response[REPLAYED_HEADER] = "true"
    return response


# --- The key record -------------------------------------------------------------------------


def _lease() -> timedelta:
    lease = app_settings.HTTP_LEASE
    if not isinstance(lease, timedelta) or lease <= timedelta(0):
        raise IdempotencyConfigurationError(
            f"IDEMPOTENCY['HTTP_LEASE'] must be a positive timedelta, not {lease!r}"
        )
    return lease


def _claim(scope: KeyScope, fingerprint: str, using: str) -> tuple[IdempotencyKey, bool] | None:
    """Find the key's record, or commit a new "in progress" marker: ``(record, created)``.

    Outside a transaction ``get_or_create`` commits the marker before returning, so a concurrent
    request sees it instead of waiting behind an uncommitted insert. ``None`` when a concurrent
    insert won and its row was deleted before it could be read: start over.
    """
    try:
        return IdempotencyKey.objects.using(using).get_or_create(
            owner=scope.owner,
            endpoint=scope.endpoint,
            key=scope.key,
            defaults={"fingerprint": fingerprint, "locked_until": timezone.now() + _lease()},
        )
    except IntegrityError:
        return None  # get_or_create ran its insert in a savepoint: the transaction is intact


def _lock_unavailable(exc: DatabaseError, using: str) -> bool:
    if connections[using].vendor == "postgresql":
        return getattr(exc.__cause__, "sqlstate", None) == "55P03"  # lock_not_available
    return True  # the NOWAIT lock is the only statement this is raised from


def _lock(record: IdempotencyKey, using: str) -> IdempotencyKey | None:
    """The record, locked for this transaction, or ``None`` if it was deleted meanwhile.

    Raises :class:`IdempotencyKeyInUse` instead of waiting when a live request holds it.
    """
    try:
        return (
            IdempotencyKey.objects.using(using)
            .select_for_update(nowait=True)
            .annotate(database_now=Now())  # the marker's age on the clock that stamped it
            .filter(pk=record.pk)
            .first()
        )
    except DatabaseError as exc:
        if not _lock_unavailable(exc, using):
            raise
        raise IdempotencyKeyInUse(record.key, retry_after=1) from exc


def _seconds_left(record: IdempotencyKey) -> int:
    """Whole seconds until the record's lease ends; 0 once it has."""
    left = (record.locked_until - timezone.now()).total_seconds()
    return max(0, math.ceil(left))


def _age(row: IdempotencyKey) -> timedelta:
    """How long ago the marker was committed, by the database's clock when it was locked."""
    now = getattr(row, "database_now", None) or timezone.now()
    return max(timedelta(0), now - row.created_at)


def _locks_prove_liveness(using: str) -> bool:
    """Whether a live request holds its key's row lock, so an unlocked marker has no owner.

    True where ``FOR UPDATE NOWAIT`` locks rows (PostgreSQL, MySQL, MariaDB, Oracle); SQLite
    ignores ``FOR UPDATE``, so there only the lease tells a dead request from a live one.
    """
    return bool(connections[using].features.has_select_for_update_nowait)


def _unheld_retry_after(record: IdempotencyKey, left: int) -> int:
    """When to retry against a marker no transaction holds: about its age, within its lease.

    A young marker is most likely a request about to take its lock (answer soon); an old one
    was left by a request that died (no point retrying before the lease ends).
    """
    return min(left, max(1, math.ceil(_age(record).total_seconds())))


def _takeable(row: IdempotencyKey, using: str) -> bool:
    """Whether an "in progress" marker this request holds the lock of has no live owner."""
    if not _seconds_left(row):
        return True  # the lease ended: on any database
    return _locks_prove_liveness(using) and _age(row) >= CLAIM_WINDOW


def _check_reuse(record: IdempotencyKey, fingerprint: str) -> None:
    if record.fingerprint != fingerprint:
        raise IdempotencyKeyReused(record.key)


def _release(record: IdempotencyKey, using: str) -> None:
    """Forget an unfinished key, so the client's retry runs the request again.

    The failure being cleaned up after is often the database itself (a reset connection, a
    fail-over), so the release is retried on a fresh connection for about two seconds. If it
    still cannot be written, the marker stays: on a database with row locks the next retry takes
    it over at once (nobody holds its lock); elsewhere it answers 409 until its lease ends.
    """
    connection = connections[using]
    deadline = time.monotonic() + _RELEASE_BUDGET
    failure: Error | None = None
    for pause in _RELEASE_PAUSES:
        time.sleep(pause)
        try:
            with transaction.atomic(using=using):
                row = _lock(record, using)
                if row is not None and row.state == KeyState.IN_PROGRESS:
                    row.delete()
            return
        except IdempotencyKeyInUse:
            return  # a retry took the key over; it completes or releases it itself
        except Error as exc:
            failure = exc
            # Inside a transaction of the caller's (ATOMIC_REQUESTS) nothing more can be done;
            # otherwise the next attempt starts on a new connection.
            if connection.in_atomic_block or time.monotonic() >= deadline:
                break
            connection.close()
    # Best effort, after a failure that is more important to report.
    logger.warning(
        "could not release idempotency key %r; a retry takes it over once nobody holds it",
        record.key,
        exc_info=failure,
    )


def _complete(
    record: IdempotencyKey, response: HttpResponseBase, headers: Iterable[str], using: str
) -> None:
    if response.streaming:
        raise IdempotencyConfigurationError(
            "a streaming response cannot be stored for replay; do not decorate this view"
        )
    assert isinstance(response, HttpResponse)
    record.state = KeyState.COMPLETED
    record.completed_at = timezone.now()
    record.response_status = response.status_code
    record.response_headers = {
        name: response[name] for name in headers if response.has_header(name)
    }
    record.response_body = response.content
    record.save(
        using=using,
        update_fields=[
            "state",
            "completed_at",
            "response_status",
            "response_headers",
            "response_body",
        ],
    )


# --- Running the view -----------------------------------------------------------------------


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
                row = _lock(record, using)
            except IdempotencyKeyInUse:
                owned = False  # a retry took the marker over before this request locked it
                raise
            if row is None:
                owned = False
                return None
            _check_reuse(row, fingerprint)
            if row.state == KeyState.COMPLETED:
                owned = False
                return replay(row)
            if not created:
                if not _takeable(row, using):
                    # A marker nobody holds: a request about to lock it, or a dead one's.
                    raise IdempotencyKeyInUse(row.key, _unheld_retry_after(row, _seconds_left(row)))
                row.locked_until = timezone.now() + _lease()
                row.save(using=using, update_fields=["locked_until"])
            owned = True
            response = _render(view, request, handler, args, kwargs)
            keep = response.status_code < 500 and not transaction.get_rollback(using=using)
            if keep:
                _complete(row, response, options.replay_headers, using)
            else:
                # Neither the effect nor the key: the client retries from a clean slate.
                transaction.set_rollback(True, using=using)
        stored = keep
        return response
    finally:
        if owned and not stored:
            _release(record, using)


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
        claimed = _claim(scope, fingerprint, using)
        if claimed is None:
            continue
        record, created = claimed
        if not created:
            # Final states need no lock: a completed record never changes.
            _check_reuse(record, fingerprint)
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
