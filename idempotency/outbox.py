"""A transactional outbox for Celery tasks: nothing is lost between the commit and the publish.

``enqueue()`` stores the task message in the caller's transaction; after the commit it is
published at once (best effort), and whatever that misses (the broker was down, the process
died) is published by the relay: ``manage.py relay_outbox`` or the ``relay_outbox`` Celery beat
task. Relaying is at least once (a crash between publish and mark publishes again), which the
consumers' inbox absorbs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from celery import current_app
from django.db import DatabaseError, transaction
from django.utils import timezone

logger = logging.getLogger("idempotency")

#: The immediate publish after a commit gives up fast when the broker is away; the relay retries.
IMMEDIATE_RETRY_POLICY = {"max_retries": 0}


def enqueue(
    task: Any,
    args: Sequence[Any] = (),
    kwargs: dict[str, Any] | None = None,
    *,
    event_id: str = "",
    options: dict[str, Any] | None = None,
    publish_on_commit: bool = True,
) -> Any:
    """Store a message for *task* (a task or its name) in the current transaction."""
    from .models import OutboxMessage

    name = task if isinstance(task, str) else task.name
    message = OutboxMessage.objects.create(
        task_name=name,
        args=list(args),
        kwargs=kwargs or {},
        options=options or {},
        event_id=str(event_id),
    )
    if publish_on_commit:
        transaction.on_commit(
            lambda: relay(ids=[message.pk], retry_policy=IMMEDIATE_RETRY_POLICY, quiet=True),
            using=OutboxMessage.objects.db,
        )
    return message


def relay(
    *,
    batch_size: int = 100,
    ids: Sequence[int] | None = None,
    retry_policy: dict[str, Any] | None = None,
    quiet: bool = False,
) -> int:
    """Publish pending messages, oldest first, one batch per transaction; the number published.

    Rows are taken with ``SELECT ... FOR UPDATE SKIP LOCKED`` (where the database has it), so
    several relays share the work without publishing a row twice while it is locked. Stops at the
    first message the broker refuses; it stays pending for the next run.
    """
    from .models import OutboxMessage

    published = 0
    while True:
        with transaction.atomic(using=OutboxMessage.objects.db):
            pending = OutboxMessage.objects.pending().order_by("pk")
            if ids is not None:
                pending = pending.filter(pk__in=ids)
            batch = list(pending.select_for_update(skip_locked=True)[:batch_size])
            if not batch:
                return published
            sent, failure = _publish(batch, retry_policy)
            now = timezone.now()
            OutboxMessage.objects.filter(pk__in=[m.pk for m in sent]).update(published_at=now)
            published += len(sent)
        if failure is not None:
            if not quiet:
                raise failure
            logger.warning("outbox relay stopped: %s; the relay will retry", failure)
            return published


def _publish(
    batch: list[Any], retry_policy: dict[str, Any] | None
) -> tuple[list[Any], BaseException | None]:
    from .models import OutboxMessage

    sent: list[Any] = []
    for message in batch:
        try:
            current_app.send_task(
                message.task_name,
                args=message.args,
                kwargs=message.kwargs,
                task_id=str(message.task_id),
                retry=retry_policy is None or bool(retry_policy.get("max_retries")),
                retry_policy=retry_policy,
                **message.options,
            )
        except broker_errors() as exc:
            # Recorded in its own savepoint so the messages already sent still get marked.
            try:
                with transaction.atomic(using=OutboxMessage.objects.db):
                    OutboxMessage.objects.filter(pk=message.pk).update(
                        attempts=message.attempts + 1, last_error=repr(exc)[:2000]
                    )
            except DatabaseError:
                logger.exception("could not record the outbox publish failure")
            return sent, exc
        sent.append(message)
    return sent, None


def broker_errors() -> tuple[type[BaseException], ...]:
    """What a publish can raise when the broker is away, for the configured transport."""
    from kombu.exceptions import KombuError

    connection = current_app.connection_for_write()
    try:
        return (
            KombuError,
            OSError,
            *connection.connection_errors,
            *connection.channel_errors,
        )
    finally:
        connection.release()
