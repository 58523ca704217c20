"""The relay: publish the pending outbox messages, one batch per transaction.

Relaying is at least once (a crash between publish and mark publishes again), which the
consumers' inbox absorbs. A message refused for good is set aside (``failed_at``); a broker
outage stops the run and leaves its messages pending.
"""

from __future__ import annotations

# The celery extra: without it, say which to install rather than fail on a bare import.
try:
    import celery  # noqa: F401
    import kombu  # noqa: F401
except ImportError as _exc:
    from ..extras import missing

    raise missing("celery", "idempotency.outbox") from _exc

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from celery import current_app
from django.db import router, transaction
from django.db.models import F
from django.db.models.functions import Now

logger = logging.getLogger("idempotency")


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
