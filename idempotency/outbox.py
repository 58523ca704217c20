"""A transactional outbox for Celery tasks: nothing is lost between the commit and the publish.

``enqueue()`` stores the task message in the caller's transaction. After the commit, the
messages that transaction stored are published at once, best effort: one short, bounded attempt
(``PUBLISH_TIMEOUT``) for all of them, skipped altogether while a recent failure keeps the
process's circuit breaker open (``PUBLISH_BREAKER_COOLDOWN``). Whatever that misses (the broker
was down, the process died) is published by the relay: ``manage.py relay_outbox`` or the
``relay_outbox`` Celery beat task. Relaying is at least once (a crash between publish and mark
publishes again), which the consumers' inbox absorbs.

A message the broker cannot take for a reason that retrying will not fix (a queue no longer
configured, an option the serializer or the transport rejects) is marked failed (``failed_at``,
``last_error``) and the relay goes on with the others; ``OutboxMessage.objects.redrive()`` (the
admin action, ``relay_outbox --retry-failed``) puts it back once the cause is fixed. A broker
outage stops a batch and leaves its messages pending. Every write, lock and transaction is on
the router's write alias. See docs/outbox.md.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from celery import current_app
from django.db import DatabaseError, connections, router, transaction
from django.db.models import F
from django.db.models.functions import Now

from .conf import app_settings
from .exceptions import InvalidEvent

if TYPE_CHECKING:
    from .models import OutboxMessage

logger = logging.getLogger("idempotency")

#: Idle broker connections the immediate publish keeps per process, for the next commits.
IDLE_CONNECTIONS = 8


def enqueue(
    task: Any,
    args: Sequence[Any] = (),
    kwargs: dict[str, Any] | None = None,
    *,
    event_id: str = "",
    options: dict[str, Any] | None = None,
    publish_on_commit: bool = True,
) -> OutboxMessage:
    """Store a message for *task* (a task or its name) in the current transaction.

    With *publish_on_commit*, it is published right after the commit, together with the other
    messages the transaction stored (one attempt for all of them); never before the commit, and
    never for a transaction that rolled back. Nothing raises into the caller after its commit.
    """
    from .models import OutboxMessage

    alias = router.db_for_write(OutboxMessage)
    name = task if isinstance(task, str) else task.name
    if isinstance(args, (str, bytes)):
        # list("abc") would quietly become three arguments.
        raise TypeError(f"args must be a list or tuple of arguments, not {type(args).__name__}")
    _check_storable(args, kwargs, options)
    message = OutboxMessage.objects.using(alias).create(
        task_name=name,
        args=list(args),
        kwargs=kwargs or {},
        options=options or {},
        event_id=str(event_id),
    )
    if publish_on_commit:
        _publish_after_commit(alias, message.pk)
    return message


#: A NUL as json.dumps escapes it: ``\u0000`` after an even number of backslashes (an odd
#: number is a literal backslash followed by the text "u0000").
_ESCAPED_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


def _check_storable(*parts: Any) -> None:
    """Refuse, before the insert, what the JSON columns or the broker cannot carry: the
    database would answer with an integrity or data error (or store it for a relay to choke
    on), which a caller would take for an outage. Types JSON has no form for stay TypeError."""
    try:
        text = json.dumps(parts, allow_nan=False, ensure_ascii=False)
        text.encode("utf-8")  # a lone surrogate
    except (ValueError, RecursionError) as exc:
        raise InvalidEvent(f"outbox message arguments cannot be stored: {exc}") from exc
    if _ESCAPED_NUL.search(text):  # json escapes NUL; PostgreSQL refuses it in jsonb
        raise InvalidEvent("outbox message arguments cannot be stored: they hold a NUL character")


class _PublishAfterCommit:
    """The one ``on_commit`` callback of a transaction: publishes the ids it collected."""

    def __init__(self, alias: str) -> None:
        self.alias = alias
        self.ids: list[int] = []
        self.ran = False

    def __call__(self) -> None:
        self.ran = True
        # The transaction has committed: its outcome is durable and the relay owes the rest.
        # Whatever goes wrong now must not reach the producer (a view would answer 500 for
        # accepted data, an inbox claim would report its committed delivery as failed).
        try:
            publish_now(self.ids, using=self.alias)
        except Exception:
            logger.exception("outbox: the publish after commit failed; the relay will publish")


def _publish_after_commit(alias: str, pk: int) -> None:
    connection = connections[alias]
    if not connection.in_atomic_block:
        # Autocommit: the row is committed already.
        callback = _PublishAfterCommit(alias)
        callback.ids.append(pk)
        callback()
        return
    # Join the callback this transaction already has, registered in the atomic block that is
    # open now or one enclosing it (so it runs at the same commit, or is dropped with this row
    # by the same rollback). One in a block that has ended (a sibling savepoint) is left
    # alone: a second callback costs at most one more attempt, which the breaker cuts short.
    open_blocks = set(connection.savepoint_ids)
    for entry in reversed(connection.run_on_commit):  # (savepoint ids, callback, robust)
        joined = entry[1]
        if (
            isinstance(joined, _PublishAfterCommit)
            and joined.alias == alias
            and not joined.ran
            and set(entry[0]) <= open_blocks
        ):
            joined.ids.append(pk)
            return
    callback = _PublishAfterCommit(alias)
    callback.ids.append(pk)
    transaction.on_commit(callback, using=alias, robust=True)


# --- The immediate publish: bounded, pooled, behind a circuit breaker -----------------------


class _Publisher:
    """Process-wide state of the immediate publish: idle bounded connections and the breaker.

    Keyed by the broker the Celery app writes to (and the process id: a forked child must not
    share its parent's sockets), so a change of broker starts afresh.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: tuple[Any, ...] | None = None
        self._idle: list[Any] = []
        self._open_until = 0.0

    def _select(self, key: tuple[Any, ...]) -> None:
        # With the lock held.
        if key == self._key:
            return
        stale, self._idle = self._idle, []
        same_process = self._key is not None and self._key[0] == key[0]
        self._key, self._open_until = key, 0.0
        if same_process:
            for conn in stale:
                _close_quietly(conn)

    def is_open(self, key: tuple[Any, ...]) -> bool:
        with self._lock:
            self._select(key)
            return time.monotonic() < self._open_until

    def trip(self, key: tuple[Any, ...], cooldown: float) -> None:
        with self._lock:
            self._select(key)
            self._open_until = time.monotonic() + cooldown

    def close_breaker(self, key: tuple[Any, ...]) -> None:
        with self._lock:
            self._select(key)
            self._open_until = 0.0

    def reset(self) -> None:
        """Close the breaker and the idle connections (after a configuration change, in tests)."""
        with self._lock:
            stale, self._idle = self._idle, []
            self._key, self._open_until = None, 0.0
        for conn in stale:
            _close_quietly(conn)

    def acquire(self, key: tuple[Any, ...], *, reuse: bool) -> Any:
        """An idle connection kept from an earlier commit, if *reuse* and there is one."""
        with self._lock:
            self._select(key)
            return self._idle.pop() if reuse and self._idle else None

    def release(self, key: tuple[Any, ...], conn: Any, *, healthy: bool) -> None:
        """Keep *conn* for the next commit if it served well; close it otherwise, so the next
        commit connects afresh."""
        with self._lock:
            keep = healthy and key == self._key and len(self._idle) < IDLE_CONNECTIONS
            if keep:
                self._idle.append(conn)
        if not keep:
            _close_quietly(conn)


#: The process's immediate publisher; ``publisher.reset()`` closes its breaker.
publisher = _Publisher()


def _broker_key() -> tuple[Any, ...]:
    conf = current_app.conf
    return (
        os.getpid(),
        str(conf.broker_write_url),
        repr(conf.broker_transport_options),
        app_settings.PUBLISH_TIMEOUT,
    )


def _bounded_connection(timeout: float) -> Any:
    """A broker connection whose connect, handshake, reads and writes give up after *timeout*.

    ``connect_timeout`` bounds the TCP connect and, on py-amqp, the AMQP handshake too (a
    listener that accepts and never answers); redis-py needs its socket timeouts, without which
    a silent server blocks a command forever.
    """
    conn = current_app.connection_for_write(connect_timeout=timeout, heartbeat=0)
    driver = getattr(conn.transport, "driver_type", "")
    if conn.transport_options is None:
        conn.transport_options = {}
    if driver == "amqp":
        conn.transport_options.update(read_timeout=timeout, write_timeout=timeout)
    elif driver == "redis":
        conn.transport_options.update(socket_timeout=timeout, socket_connect_timeout=timeout)
    return conn


def _left(deadline: float) -> float:
    return max(deadline - time.monotonic(), 0.001)


def _close_quietly(conn: Any) -> None:
    try:
        conn.release()
    except Exception:  # a connection that is already broken has nothing left to close
        logger.debug("outbox: closing a broker connection failed", exc_info=True)


def publish_now(ids: Sequence[int], *, using: str | None = None) -> int:
    """Publish the pending messages *ids* at once, in one bounded attempt; the number published.

    The attempt (connect and publish together) ends after ``PUBLISH_TIMEOUT``. If it fails, the
    breaker opens for ``PUBLISH_BREAKER_COOLDOWN`` and the commits of that time skip this
    altogether; the relay publishes what is left either way. A connection kept from an earlier
    commit that turns out dead (the broker restarted since) is replaced once, within the same
    time, before the attempt counts as failed.
    """
    from .models import OutboxMessage

    if not ids:
        return 0
    alias = using or router.db_for_write(OutboxMessage)
    key = _broker_key()
    if publisher.is_open(key):
        logger.debug("outbox: publish breaker open; %d message(s) left to the relay", len(ids))
        return 0
    deadline = time.monotonic() + app_settings.PUBLISH_TIMEOUT.total_seconds()
    published = 0
    failure: BaseException | None = None
    for fresh in (False, True):
        conn = publisher.acquire(key, reuse=not fresh)
        reused, healthy = conn is not None, False
        try:
            if conn is None:
                conn = _bounded_connection(_left(deadline))
            # One attempt, no retry loop: kombu's own retries until broker_connection_timeout
            # (6 s with the port closed).
            conn.ensure_connection(max_retries=0, timeout=_left(deadline))
            result = relay_messages(
                ids=ids,
                using=alias,
                producer=current_app.amqp.Producer(conn),
                deadline=deadline,
                count_outage=False,
            )
            published += result.published
            failure = result.outage
            healthy = failure is None
        except DatabaseError as exc:
            # The database, not the broker, failed after the commit: the rows are pending.
            logger.warning("outbox: the publish after commit could not read the outbox: %s", exc)
            return published
        except Exception as exc:
            failure = exc
        finally:
            if conn is not None:
                publisher.release(key, conn, healthy=healthy)
        if failure is not None and reused and _left(deadline) > 0.001 and is_outage(failure):
            continue  # a kept connection the broker dropped since: one fresh try, same deadline
        break
    if failure is None:
        publisher.close_breaker(key)
        return published
    publisher.trip(key, app_settings.PUBLISH_BREAKER_COOLDOWN.total_seconds())
    logger.warning(
        "outbox: publishing %d message(s) after commit failed (%s); the relay will publish "
        "them, and commits in the next %s skip the attempt",
        len(ids) - published,
        describe(failure),
        app_settings.PUBLISH_BREAKER_COOLDOWN,
    )
    OutboxMessage.objects.using(alias).filter(pk__in=ids).pending().update(
        attempts=F("attempts") + 1, last_error=describe(failure)
    )
    return published


# --- The relay ------------------------------------------------------------------------------


@dataclass
class Relayed:
    """What a relay run did."""

    published: int = 0
    #: Messages set aside (``failed_at``): refused for good while the others went through.
    failed: int = 0
    #: Messages that failed with an unexpected error while nothing after them went through:
    #: left pending (``attempts``, ``last_error``), as the cause may be the process, not them.
    held: int = 0
    #: The broker error that stopped the run (its messages stay pending), if any.
    outage: BaseException | None = None


@dataclass
class _Outcome:
    sent: list[int] = field(default_factory=list)
    failed: list[tuple[Any, BaseException]] = field(default_factory=list)
    held: list[tuple[Any, BaseException]] = field(default_factory=list)
    outage: tuple[Any, BaseException] | None = None
    interrupted: BaseException | None = None


def relay(
    *,
    batch_size: int = 100,
    ids: Sequence[int] | None = None,
    quiet: bool = False,
    using: str | None = None,
) -> int:
    """Publish pending messages, oldest first, one batch per transaction; the number published.

    A broker outage stops the run (raised unless *quiet*; the messages stay pending). A message
    refused for good is marked failed and the run goes on. See :func:`relay_messages`.
    """
    result = relay_messages(batch_size=batch_size, ids=ids, using=using)
    if result.outage is not None:
        if not quiet:
            raise result.outage
        logger.warning("outbox relay stopped: %s; the relay will retry", describe(result.outage))
    return result.published


def relay_messages(
    *,
    batch_size: int = 100,
    ids: Sequence[int] | None = None,
    using: str | None = None,
    producer: Any = None,
    deadline: float | None = None,
    count_outage: bool = True,
) -> Relayed:
    """Publish pending messages, oldest first, one batch per transaction, on the write alias.

    Rows are taken with ``SELECT ... FOR UPDATE SKIP LOCKED`` (where the database has it), so
    several relays share the work without publishing a row twice while it is locked. The rows
    a batch sent are marked in its transaction whatever happens to the rows after them. With
    *producer* and *deadline* (a ``time.monotonic()`` value) every publish is bounded by the
    time left and never retried; without, Celery's connection pool and retry policy apply.

    Which failures set a message aside: an error that names the message itself (its queue is
    not configured, its serializer or options are refused, the broker refused its exchange) at
    once; any other unexpected error only once a message after it went through, which shows
    the fault is the message's and not the process's. Until then it stays pending.
    """
    from .models import OutboxMessage

    alias = using or router.db_for_write(OutboxMessage)
    rows = OutboxMessage.objects.using(alias)
    result = Relayed()
    # Rows held by an earlier batch of this run: skipped by the next batches, so a run of them
    # as long as a batch cannot hold back the rows after it, and set aside once one of those
    # goes through.
    held: list[tuple[Any, BaseException]] = []
    while True:
        with transaction.atomic(using=alias):
            pending = rows.pending().order_by("pk")
            if ids is not None:
                pending = pending.filter(pk__in=ids)
            if held:
                pending = pending.exclude(pk__in=[message.pk for message, _ in held])
            batch = list(pending.select_for_update(skip_locked=True)[:batch_size])
            if not batch:
                return result
            outcome = _publish(batch, producer, deadline)
            if outcome.sent and held:
                proven, held = held, []
                # Unlocked since their batch: another relay may have published them.
                rows.pending().filter(pk__in=[m.pk for m, _ in proven]).update(failed_at=Now())
                result.failed += len(proven)
                result.held -= len(proven)
                for message, exc in proven:
                    _log_failed(message, exc)
            if outcome.sent:
                rows.filter(pk__in=outcome.sent).update(published_at=Now())
            for message, exc in outcome.failed:
                rows.filter(pk=message.pk).update(
                    failed_at=Now(), attempts=F("attempts") + 1, last_error=describe(exc)
                )
            retried = [
                *outcome.held,
                *([outcome.outage] if count_outage and outcome.outage else []),
            ]
            for message, exc in retried:
                rows.filter(pk=message.pk).update(
                    attempts=F("attempts") + 1, last_error=describe(exc)
                )
        result.published += len(outcome.sent)
        result.failed += len(outcome.failed)
        result.held += len(outcome.held)
        for message, exc in outcome.failed:
            _log_failed(message, exc)
        held.extend(outcome.held)
        for message, exc in outcome.held:
            logger.warning(
                "outbox: message %s (%s) could not be published and stays pending: %s",
                message.pk,
                message.task_name,
                describe(exc),
                exc_info=exc,
            )
        if outcome.interrupted is not None:
            raise outcome.interrupted
        if outcome.outage is not None:
            result.outage = outcome.outage[1]
            return result
        if not outcome.sent and not outcome.failed and len(batch) < batch_size:
            return result  # only held rows left: trying them again now would change nothing


def _log_failed(message: Any, exc: BaseException) -> None:
    logger.error(
        "outbox: message %s (%s, event %r) failed for good and is set aside until re-driven: %s",
        message.pk,
        message.task_name,
        message.event_id,
        describe(exc),
        extra={"outbox_message": message.pk, "task_name": message.task_name},
    )


def _publish(batch: list[Any], producer: Any, deadline: float | None) -> _Outcome:
    outcome = _Outcome()
    suspects: list[tuple[Any, BaseException]] = []
    for message in batch:
        bounded: dict[str, Any] = {}
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                outcome.outage = (message, TimeoutError("the publish ran out of time"))
                break
            bounded = {
                "producer": producer,
                "retry": False,
                "timeout": remaining,
                "confirm_timeout": remaining,
            }
        try:
            current_app.send_task(
                message.task_name,
                args=message.args,
                kwargs=message.kwargs,
                task_id=str(message.task_id),
                **{**message.options, **bounded},
            )
        except BaseException as exc:
            if not isinstance(exc, Exception):  # KeyboardInterrupt, SystemExit: after marking
                outcome.interrupted = exc
                break
            if is_outage(exc):
                outcome.outage = (message, exc)
                break
            if isinstance(exc, _refusals()):
                outcome.failed.append((message, exc))
            else:
                suspects.append((message, exc))
            continue
        outcome.sent.append(message.pk)
        # The publish works for this message: those that failed before it are at fault.
        outcome.failed.extend(suspects)
        suspects = []
    outcome.held = suspects
    return outcome


def is_outage(exc: BaseException) -> bool:
    """Whether *exc* says the broker is away (retry later) rather than that it refused this
    one message (retrying will not help)."""
    from kombu.exceptions import OperationalError

    if isinstance(exc, _refusals()):
        return False
    if isinstance(exc, OperationalError | OSError):  # kombu wraps connection errors in the first
        return True
    connection = current_app.connection_for_write()
    try:
        return isinstance(
            exc, (*connection.connection_errors, *connection.channel_errors, *_transient())
        )
    finally:
        connection.release()


def _refusals() -> tuple[type[BaseException], ...]:
    """Errors about one message: its queue, serializer, compression or encoding, or the broker
    refusing its exchange or routing. Anything else may be the process's or the broker's."""
    import struct

    from celery.exceptions import QueueNotFound
    from kombu.exceptions import ContentDisallowed, EncodeError, SerializerNotInstalled

    found: list[type[BaseException]] = [
        QueueNotFound,
        EncodeError,
        SerializerNotInstalled,
        ContentDisallowed,
        struct.error,  # py-amqp encoding a property of the wrong type (a priority "high")
    ]
    try:
        from amqp.exceptions import IrrecoverableChannelError

        found.append(IrrecoverableChannelError)
    except ImportError:
        pass
    try:
        from redis.exceptions import DataError

        found.append(DataError)
    except ImportError:
        pass
    return tuple(found)


def _transient() -> tuple[type[BaseException], ...]:
    try:
        from amqp.exceptions import MessageNacked  # the broker's own failure to take it

        return (MessageNacked,)
    except ImportError:
        return ()


def describe(exc: BaseException) -> str:
    """The error as ``last_error`` keeps it: its type and message, at most 2000 characters."""
    kind = type(exc)
    name = (
        kind.__qualname__
        if kind.__module__ == "builtins"
        else f"{kind.__module__}.{kind.__qualname__}"
    )
    return f"{name}: {exc}"[:2000]
