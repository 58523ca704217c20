"""The in-flight handshake on the key's row: the "in progress" marker, its lock and lease.

See :mod:`idempotency.http` for how a request in flight is recognised without waiting for it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from datetime import timedelta
from typing import TYPE_CHECKING

from django.db import (
    DatabaseError,
    Error,
    IntegrityError,
    connections,
    transaction,
)
from django.db.models.functions import Now
from django.http import HttpResponse
from django.http.response import HttpResponseBase
from django.utils import timezone

from ..conf import app_settings
from ..exceptions import (
    IdempotencyConfigurationError,
    IdempotencyKeyInUse,
    IdempotencyKeyReused,
)
from .models import IdempotencyKey, KeyState

if TYPE_CHECKING:
    from .scope import KeyScope

logger = logging.getLogger("idempotency")

#: Far longer than the few statements between a marker's commit and its owner's row lock. An
#: unlocked marker this old has no live owner; taking over a younger one would be safe too (its
#: owner then fails to lock it and answers 409), only less polite.
CLAIM_WINDOW = timedelta(seconds=2)

#: Pauses before each attempt to release a key after a failure, about two seconds in all: long
#: enough to outlast a connection reset or a fail-over blip, short enough for a request thread.
_RELEASE_PAUSES = (0.0, 0.25, 0.5, 1.0)
_RELEASE_BUDGET = 2.0


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
