"""The outbox reconciler: a published message whose event shows no outcome is published again.

Publishing hands a message to the broker; only the consumer's inbox shows that it arrived. A
broker can lose a message it took: kombu's Redis transport pops it off the queue, then records
it as unacknowledged in a second round trip, so a whole worker SIGKILLed between the two loses
it for good (celery/celery#7950); the filesystem transport deletes a consumed file before the
task runs; any broker or network path outside our control may do the same. The producer side
notices, because the outbox keeps every message it published:

- a published message is *checked* once ``RECONCILE_AFTER`` has passed since its publish: an
  outcome is its task's inbox record (``ProcessedEvent`` for the task's consumer and the key
  the worker claims) or a dead letter (by task id, or by task and key). With one, the row is
  closed (``reconciled_at``) and never looked at again;
- without one, it is published again, under the same task id: safe by construction, as the
  inbox discards a duplicate (a message merely queued behind a backlog, or being committed at
  that moment, is one). The next check waits twice as long as the last;
- after ``RECONCILE_REPUBLISHES`` republishes with still no outcome (a message parked in a
  dead-letter queue nobody imported, a task no worker runs any more), the row is set aside as
  failed with the reason: visible in the admin, re-driven like any failed outbox row;
- it never republishes what it cannot verify: a task not registered in this process, one that
  is not ``@idempotent_task`` (nothing records its outcome), a row without an event id or
  whose event yields no key. Such a row is closed at its first check, counted and logged;
- it looks back only as far as the inbox retention allows: a row older than its consumer's
  retention less ``RECONCILE_AFTER`` is closed unchecked, since its inbox record may have been
  purged, and republishing it then would apply the effect twice.

It runs in ``relay_outbox --forever`` (``--reconcile-every``), as ``relay_outbox
--reconcile`` and as the ``idempotency.tasks.reconcile_outbox`` beat task. Rows are taken in
bounded batches with ``SELECT ... FOR UPDATE SKIP LOCKED`` on the router's write alias, so two
reconcilers share the work and never republish a row twice; times come from the database.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from datetime import timezone as dt_timezone
from typing import Any

from django.db import DEFAULT_DB_ALIAS, router, transaction
from django.db.models import F, Q
from django.db.models.functions import Now
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from .. import signals
from ..clock import database_now
from ..conf import app_settings
from ..exceptions import IdempotencyConfigurationError
from ..inbox.retention import RetentionCutoffs
from ..keys import extract_key
from .models import OutboxMessage

logger = logging.getLogger("idempotency")

#: The largest batch: one batch is one transaction holding its rows locked.
MAX_BATCH_SIZE = 10_000


@dataclass
class Reconciled:
    """What a reconcile run did, row by row."""

    #: Rows whose check was due.
    checked: int = 0
    #: An inbox record or a dead letter seen: closed.
    confirmed: int = 0
    #: Published again: no outcome was seen.
    republished: int = 0
    #: Set aside as failed: no outcome after ``RECONCILE_REPUBLISHES`` republishes.
    failed: int = 0
    #: Closed without a check: nothing here can tell their outcome (see the module).
    unverifiable: int = 0
    #: Closed without a check: older than the inbox retention lets the reconciler look back.
    expired: int = 0
    #: Republished before, their next check not yet due.
    waiting: int = 0
    #: Could not be republished for an error of their own; checked again next time.
    held: int = 0
    #: The broker error that stopped the run, if any (the rest waits for the next run).
    outage: BaseException | None = None

    def summary(self) -> str:
        return (
            f"checked {self.checked} published message(s): {self.confirmed} with an outcome, "
            f"{self.republished} republished, {self.failed} set aside as failed, "
            f"{self.unverifiable} unverifiable, {self.expired} past the look-back, "
            f"{self.waiting} waiting"
            + (f", {self.held} could not be republished" if self.held else "")
        )


@dataclass(frozen=True)
class Consumer:
    """Where the outcome of a message's event is recorded."""

    consumer: str
    key: str
    using: str


def backoff(republished: int, after: timedelta) -> timedelta:
    """How long after its last publish a row republished *republished* times is checked."""
    return after * 2 ** min(republished, 30)


def span(after: timedelta, republishes: int) -> timedelta:
    """From the first publish to the check that sets a row aside: the reconciler's window."""
    return sum((backoff(n, after) for n in range(republishes + 1)), timedelta(0))


_loaded: set[int] = set()


def _tasks() -> Any:
    """The task registry, with the project's task modules imported.

    Only a worker imports them (``autodiscover_tasks`` is lazy): in a relay process the
    registry would otherwise miss every task and nothing could be verified.
    """
    from celery import current_app

    app: Any = current_app._get_current_object()  # type: ignore[attr-defined]
    if id(app) not in _loaded:
        app.loader.import_default_modules()
        _loaded.add(id(app))
    return app.tasks


def consumer_of(message: Any, tasks: Any) -> Consumer | str:
    """Where *message*'s outcome is recorded, or why that cannot be told from here."""
    from ..inbox import inbox_database

    task = tasks.get(message.task_name)
    if task is None:
        return f"its task {message.task_name!r} is not registered in this process"
    if getattr(task, "idempotent", False) is not True:
        return f"{message.task_name!r} is not an @idempotent_task: nothing records its outcome"
    if not message.event_id:
        return "it has no event id"
    options = message.options if isinstance(message.options, dict) else {}
    if options.get("expires") is not None:
        # Celery discards it unrun once expired, by the producer's wish: a copy would get a
        # fresh expiry (a relative one) and run what was meant never to run that late.
        return "it has an expiry (a message that expired unrun leaves no outcome, by design)"
    if not isinstance(message.args, list) or not message.args:
        return "it has no event argument"
    spec = task.key_spec if task.key_spec is not None else app_settings.KEY
    try:
        key = extract_key(message.args[0], spec)
        again = extract_key(message.args[0], spec)
    # A key function of the project's may raise anything; the worker dead-letters such an
    # event, and without a key there is no inbox record to look for.
    except Exception as exc:
        return f"its event has no usable key ({exc})"
    if again != key:
        # A key function that draws a new key each call (a uuid4, the time) never finds the
        # worker's record, and the worker would claim a fresh key for the copy: applied twice.
        return f"its key is not the same twice ({key!r}, then {again!r})"
    return Consumer(task.consumer_name or task.name, key, task.inbox_using or inbox_database())


def _processed(wanted: Iterable[Consumer]) -> set[tuple[str, str, str]]:
    """Those of *wanted* (as (using, consumer, key)) that have an inbox record."""
    from ..inbox.models import ProcessedEvent

    by_alias: dict[str, set[tuple[str, str]]] = {}
    for item in wanted:
        by_alias.setdefault(item.using, set()).add((item.consumer, item.key))
    found: set[tuple[str, str, str]] = set()
    for alias, pairs in by_alias.items():
        records = ProcessedEvent.objects.using(alias).filter(
            event_id__in=sorted({key for _, key in pairs})
        )
        found.update(
            (alias, consumer, key)
            for consumer, key in records.values_list("consumer", "event_id")
            if (consumer, key) in pairs
        )
    return found


def _dead_lettered(messages: list[Any], keys: dict[int, Consumer]) -> set[int]:
    """The pks of *messages* that have a dead letter: by task id, or by task name and key."""
    from ..deadletters.models import DeadLetter

    letters = DeadLetter.objects.using(router.db_for_write(DeadLetter) or DEFAULT_DB_ALIAS)
    task_ids = {str(m.task_id): m.pk for m in messages}
    by_key = {(m.task_name, keys[m.pk].key): m.pk for m in messages if m.pk in keys}
    condition = Q(task_id__in=sorted(task_ids))
    if by_key:
        condition |= Q(event_id__in=sorted({key for _, key in by_key}))
    found: set[int] = set()
    for task_id, task_name, event_id in letters.filter(condition).values_list(
        "task_id", "task_name", "event_id"
    ):
        if task_id in task_ids:
            found.add(task_ids[task_id])
        if (task_name, event_id) in by_key:
            found.add(by_key[(task_name, event_id)])
    return found


def _settings() -> tuple[timedelta | None, int]:
    """``RECONCILE_AFTER`` and ``RECONCILE_REPUBLISHES``, or the error check E010 reports."""
    after = app_settings.RECONCILE_AFTER
    limit = app_settings.RECONCILE_REPUBLISHES
    if after is not None and (not isinstance(after, timedelta) or after <= timedelta(0)):
        raise IdempotencyConfigurationError(
            f"IDEMPOTENCY['RECONCILE_AFTER'] must be a positive timedelta or None, not {after!r}"
        )
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise IdempotencyConfigurationError(
            f"IDEMPOTENCY['RECONCILE_REPUBLISHES'] must be an integer of 0 or more, not {limit!r}"
        )
    return after, limit


def reconcile(*, batch_size: int = 100, using: str | None = None) -> Reconciled:
    """Check the published messages due for it, oldest first; see the module.

    One batch of at most *batch_size* rows per transaction, its rows locked (``SKIP LOCKED``:
    another reconciler takes the others). A broker outage stops the run (``outage``); what
    it did not reach waits for the next run. With ``RECONCILE_AFTER`` None it does nothing.
    """
    if (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, int)
        or not 1 <= batch_size <= MAX_BATCH_SIZE
    ):
        # Past the maximum the database refuses the LIMIT, which a relay would retry for ever.
        raise ValueError(
            f"batch_size must be an integer from 1 to {MAX_BATCH_SIZE}, not {batch_size!r}"
        )
    result = Reconciled()
    after, limit = _settings()
    if after is None:
        return result
    alias = using or router.db_for_write(OutboxMessage) or DEFAULT_DB_ALIAS
    rows = OutboxMessage.objects.using(alias)
    tasks = _tasks()
    now = database_now(alias)
    due = rows.unreconciled().filter(published_at__lte=now - after)
    last: tuple[datetime, int] | None = None
    while True:
        with transaction.atomic(using=alias):
            scan = due
            if last is not None:
                scan = scan.filter(
                    Q(published_at__gt=last[0]) | Q(published_at=last[0], pk__gt=last[1])
                )
            batch = list(
                scan.order_by("published_at", "pk").select_for_update(skip_locked=True)[:batch_size]
            )
            if not batch:
                return result
            tail = batch[-1]
            assert tail.published_at is not None  # the scan's own condition
            last = (tail.published_at, tail.pk)
            stop = _reconcile_batch(batch, rows, tasks, now, after, limit, result)
        if stop is not None:
            raise stop
        if result.outage is not None or len(batch) < batch_size:
            return result


def _runs_at(message: Any) -> datetime:
    """When *message*'s last publish is due to run: a countdown or an eta holds it back, and
    no outcome can be expected before; the check's wait counts from then."""
    options = message.options if isinstance(message.options, dict) else {}
    start: datetime = message.published_at
    countdown = options.get("countdown")
    try:
        if isinstance(countdown, bool) or not isinstance(countdown, int | float):
            countdown = 0
        if countdown > 0:
            start += timedelta(seconds=countdown)
        eta = options.get("eta")
        when = parse_datetime(eta) if isinstance(eta, str) else None
    except (OverflowError, ValueError):  # past year 9999, or an eta that is no date
        return datetime.max.replace(tzinfo=dt_timezone.utc)
    if when is not None:
        if timezone.is_naive(when):
            when = timezone.make_aware(when, timezone.get_default_timezone())
        start = max(start, when)
    return start


def _reconcile_batch(
    batch: list[Any],
    rows: Any,
    tasks: Any,
    now: datetime,
    after: timedelta,
    limit: int,
    result: Reconciled,
) -> BaseException | None:
    """Decide and write the fate of one locked batch; an interrupt to raise after it, if any."""
    due = [m for m in batch if _runs_at(m) <= now - backoff(m.republished, after)]
    result.waiting += len(batch) - len(due)
    result.checked += len(due)
    if not due:
        return None
    consumers: dict[int, Consumer] = {}
    unverifiable: list[tuple[Any, str]] = []
    for message in due:
        found = consumer_of(message, tasks)
        if isinstance(found, Consumer):
            consumers[message.pk] = found
        else:
            unverifiable.append((message, found))
    outcome = _dead_lettered(due, consumers)
    processed = _processed(consumers.values())
    outcome.update(pk for pk, c in consumers.items() if (c.using, c.consumer, c.key) in processed)
    expired: list[Any] = []
    resend: list[Any] = []
    give_up: list[Any] = []
    for message in due:
        if message.pk in outcome:
            continue
        if message.pk not in consumers:
            continue  # unverifiable, closed below
        retention = app_settings.retention_for(consumers[message.pk].consumer)
        published = min(message.created_at, message.published_at)
        if retention is not None and published < now - retention + after:
            expired.append(message)
        elif message.republished >= limit:
            give_up.append(message)
        else:
            resend.append(message)
    unverifiable = [(m, why) for m, why in unverifiable if m.pk not in outcome]
    closed = [*outcome, *(m.pk for m, _ in unverifiable), *(m.pk for m in expired)]
    if closed:
        rows.filter(pk__in=closed).update(reconciled_at=Now())
    result.confirmed += len(outcome)
    result.unverifiable += len(unverifiable)
    result.expired += len(expired)
    for message, why in unverifiable:
        logger.info(
            "outbox reconcile: message %s (%s, event %r) is not checked and never republished: %s",
            message.pk,
            message.task_name,
            message.event_id,
            why,
            extra={"outbox_message": message.pk, "task_name": message.task_name},
        )
    if expired:
        logger.warning(
            "outbox reconcile: %d message(s) without an outcome are older than the inbox "
            "retention lets the reconciler check (their records may have been purged): "
            "closed unchecked, e.g. %s",
            len(expired),
            ", ".join(str(m.pk) for m in expired[:5]),
        )
    for message in give_up:
        _give_up(message, consumers[message.pk], rows, after)
    result.failed += len(give_up)
    return _republish(resend, consumers, rows, limit, result)


def _signal(signal: Any, message: Any, consumer: Consumer, using: str) -> None:
    """Send *signal* for *message*; a receiver's error is logged, never raised: the republish
    has reached the broker already, and rolling back its record would only send it again."""
    for receiver, response in signal.send_robust(
        sender=type(message), consumer=consumer.consumer, count=1, using=using
    ):
        if isinstance(response, Exception):
            logger.error(
                "outbox reconcile: the signal receiver %r failed for message %s: %r",
                receiver,
                message.pk,
                response,
                exc_info=response,
            )


def _give_up(message: Any, consumer: Consumer, rows: Any, after: timedelta) -> None:
    error = (
        f"no outcome seen for event {consumer.key!r} of consumer {consumer.consumer!r} "
        f"(no inbox record, no dead letter) after {message.republished} republish(es) "
        f"within {span(after, message.republished)} of its first publish: the broker may "
        "hold it where no worker consumes it (a dead-letter queue not imported), or no worker "
        "runs its task. Re-drive it once the cause is fixed."
    )
    # Back among the failed rows, with its reason, where the admin and --retry-failed find it.
    rows.filter(pk=message.pk).update(published_at=None, failed_at=Now(), last_error=error)
    _signal(signals.outbox_unresolved, message, consumer, rows.db)
    logger.error(
        "outbox reconcile: message %s (%s, event %r) set aside as failed: %s",
        message.pk,
        message.task_name,
        message.event_id,
        error,
        extra={"outbox_message": message.pk, "task_name": message.task_name},
    )


def _republish(
    resend: list[Any],
    consumers: dict[int, Consumer],
    rows: Any,
    limit: int,
    result: Reconciled,
) -> BaseException | None:
    from . import relaying  # imports Celery: not for the checks, which use span()

    if not resend:
        return None
    sent = _send(resend)
    if sent.sent:
        # The next check counts from this publish, on the database's clock.
        rows.filter(pk__in=sent.sent).update(published_at=Now(), republished=F("republished") + 1)
    by_pk = {m.pk: m for m in resend}
    for pk in sent.sent:
        message, consumer = by_pk[pk], consumers[pk]
        _signal(signals.outbox_republished, message, consumer, rows.db)
        logger.warning(
            "outbox reconcile: message %s (%s, event %r) republished: no outcome seen for "
            "consumer %r since it was published at %s (republish %d of at most %d)",
            pk,
            message.task_name,
            message.event_id,
            consumer.consumer,
            message.published_at.isoformat(),
            message.republished + 1,
            limit,
            extra={
                "outbox_message": pk,
                "task_name": message.task_name,
                "consumer": consumer.consumer,
                "event_id": consumer.key,
            },
        )
    for message, exc in sent.failed:
        # Refused for good now (its queue is gone from the settings, say): like the relay.
        rows.filter(pk=message.pk).update(
            published_at=None,
            failed_at=Now(),
            attempts=F("attempts") + 1,
            last_error=relaying.describe(exc),
        )
        relaying._log_failed(message, exc)
    for message, exc in [*sent.held, *([sent.outage] if sent.outage else [])]:
        rows.filter(pk=message.pk).update(
            attempts=F("attempts") + 1, last_error=relaying.describe(exc)
        )
    result.republished += len(sent.sent)
    result.failed += len(sent.failed)
    result.held += len(sent.held)
    if sent.outage is not None:
        result.outage = sent.outage[1]
    return sent.interrupted


def _send(resend: list[Any]) -> Any:
    """Publish *resend* on one connection whose every step is bounded by ``PUBLISH_TIMEOUT``.

    The batch's rows stay locked, in an open transaction, until this returns: with Celery's
    pool and retry policy a broker that accepts and never answers (redis-py has no socket
    timeout of its own) would hold them, and stall a relay that reconciles, for ever.
    """
    from celery import current_app

    from . import relaying
    from .publish import _bounded_connection, _close_quietly

    step = app_settings.PUBLISH_TIMEOUT.total_seconds()
    conn = _bounded_connection(step)
    try:
        try:
            conn.ensure_connection(max_retries=0, timeout=step)
        except Exception as exc:
            if not relaying.is_outage(exc):
                raise
            outcome = relaying._Outcome()
            outcome.outage = (resend[0], exc)
            return outcome
        # One step's time per message, as the publish after commit gives a whole commit.
        deadline = time.monotonic() + step * (len(resend) + 1)
        return relaying._publish(resend, current_app.amqp.Producer(conn), deadline)
    finally:
        _close_quietly(conn)


def close_for_purge(cutoffs: RetentionCutoffs, *, using: str, batch_size: int = 1000) -> int:
    """Close the open rows whose inbox records a purge with *cutoffs* on *using* may delete.

    The look-back above assumes a record lives for its consumer's retention. A purge with an
    earlier cut-off (``purge_processed_events --older-than``, ``purge(before=...)``) deletes
    records of events the reconciler may still check: it would see no outcome and republish
    an effect already applied. So, before such a purge, every open row of a consumer it purges
    whose first publish is past the same look-back, counted from the purge's cut-off, is closed
    unchecked, as the reconciler would close it. The number closed.
    """
    after, _ = _settings()
    bounds = [c for c in (cutoffs.others, *cutoffs.consumers.values()) if c is not None]
    if after is None or not bounds:
        return 0
    rows = OutboxMessage.objects.using(router.db_for_write(OutboxMessage) or DEFAULT_DB_ALIAS)
    horizon = max(bounds) + after
    candidates = rows.unreconciled().filter(Q(created_at__lt=horizon) | Q(published_at__lt=horizon))
    tasks = _tasks()
    closed, last = 0, 0
    while batch := list(candidates.filter(pk__gt=last).order_by("pk")[:batch_size]):
        last = batch[-1].pk
        gone: list[int] = []
        for message in batch:
            found = consumer_of(message, tasks)
            if not isinstance(found, Consumer) or found.using != using:
                continue  # never republished, or its records are not in the purged database
            cutoff = cutoffs.consumers.get(found.consumer, cutoffs.others)
            first = min(message.created_at, message.published_at or message.created_at)
            if cutoff is not None and first < cutoff + after:
                gone.append(message.pk)
        if gone:
            closed += rows.filter(pk__in=gone, reconciled_at__isnull=True).update(
                reconciled_at=Now()
            )
    if closed:
        logger.warning(
            "outbox reconcile: %d open message(s) closed unchecked before a purge with a cut-off "
            "earlier than the retention (their inbox records may be deleted by it)",
            closed,
        )
    return closed
