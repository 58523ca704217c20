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

Where each part lives: :mod:`.scope` (reading the key, its owner and endpoint, the request's
fingerprint; ``current_scope``), :mod:`.handshake` (the marker, its lock and lease, release
and completion), :mod:`.responses` (the replay and the problem documents), :mod:`.decorator`
(``idempotent_request``), :mod:`.models` (``IdempotencyKey``), :mod:`.admin`.

The names below are loaded on first use: ``idempotency.models`` imports
``idempotency.http.models``, which runs this file, and that must work without Django REST
framework (an optional dependency) and before the app registry is ready.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..faces import lazy_names

if TYPE_CHECKING:
    from .decorator import (
        idempotent_request,
    )
    from .handshake import (
        CLAIM_WINDOW,
    )
    from .responses import (
        PROBLEM_CONTENT_TYPE,
        PROBLEM_TYPE_PREFIX,
        REPLAYED_HEADER,
        SAFE_REPLAY_HEADERS,
        problem,
        replay,
    )
    from .scope import (
        HEADER,
        MAX_KEY_LENGTH,
        KeyScope,
        current_scope,
        default_owner,
        endpoint_of,
        owner_of,
        parse_key,
        request_fingerprint,
    )

#: Public name -> the module of this package that defines it.
_PUBLIC = {
    "HEADER": ".scope",
    "MAX_KEY_LENGTH": ".scope",
    "KeyScope": ".scope",
    "current_scope": ".scope",
    "default_owner": ".scope",
    "endpoint_of": ".scope",
    "owner_of": ".scope",
    "parse_key": ".scope",
    "request_fingerprint": ".scope",
    "PROBLEM_CONTENT_TYPE": ".responses",
    "PROBLEM_TYPE_PREFIX": ".responses",
    "REPLAYED_HEADER": ".responses",
    "SAFE_REPLAY_HEADERS": ".responses",
    "problem": ".responses",
    "replay": ".responses",
    "CLAIM_WINDOW": ".handshake",
    "idempotent_request": ".decorator",
}

__all__ = [
    "CLAIM_WINDOW",
    "HEADER",
    "MAX_KEY_LENGTH",
    "PROBLEM_CONTENT_TYPE",
    "PROBLEM_TYPE_PREFIX",
    "REPLAYED_HEADER",
    "SAFE_REPLAY_HEADERS",
    "KeyScope",
    "current_scope",
    "default_owner",
    "endpoint_of",
    "idempotent_request",
    "owner_of",
    "parse_key",
    "problem",
    "replay",
    "request_fingerprint",
]


__getattr__, __dir__ = lazy_names(__name__, _PUBLIC)
