"""Importing a broker's dead-letter queue (RabbitMQ ``<queue>.dead``) into dead letters."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .store import BROKER, database, record


@dataclass
class BrokerImport:
    """What an import of a broker dead-letter queue did (or, in a dry run, would do)."""

    queue: str
    imported: int = 0
    skipped: int = 0
    #: True when a row could not be stored: the import stopped and the message stays queued.
    interrupted: bool = False
    letters: list[Any] = field(default_factory=list)


@dataclass(frozen=True)
class BrokerMessage:
    """A dead-lettered Celery message as the broker holds it, decoded for a DeadLetter row."""

    task_name: str
    task_id: str
    args: Any
    kwargs: Any
    body: str
    headers: dict[str, Any]
    deaths: int
    why: str


def dead_letter_queue_names(queues: Iterable[Any]) -> list[str]:
    """``<queue>.dead`` of each Celery queue that RabbitMQ dead-letters (see project.queues)."""
    names = []
    for queue in queues or ():
        arguments = getattr(queue, "queue_arguments", None) or {}
        if arguments.get("x-dead-letter-exchange") is not None:
            names.append(f"{queue.name}.dead")
    return names


def import_broker_queue(
    channel: Any,
    queue: str,
    *,
    accept: Iterable[str] | None = ("json",),
    limit: int | None = None,
    dry_run: bool = False,
    progress: Callable[[str, BrokerMessage], None] | None = None,
) -> BrokerImport:
    """Drain the RabbitMQ dead-letter queue *queue* into DeadLetter rows (reason ``broker``).

    Each message is acknowledged only once its row has committed, so an interrupted import
    loses nothing (a message acknowledged late is skipped next time). A message whose task id
    already has a dead letter (the worker stored one before rejecting it) is acknowledged
    without a new row. A dry run takes the messages and gives them all back unacknowledged.
    *progress* is called with ``"imported"``, ``"skipped"`` or ``"failed"`` and the message.
    """
    from kombu import Queue

    from .models import DeadLetter

    using = database()
    source = Queue(queue, no_declare=True).bind(channel)
    outcome = BrokerImport(queue=queue)
    taken = 0
    while limit is None or taken < limit:
        message = source.get(no_ack=False, accept=list(accept) if accept is not None else None)
        if message is None:
            break
        taken += 1
        decoded = decode_broker_message(message)
        known = bool(decoded.task_id) and (
            DeadLetter.objects.using(using).filter(task_id=decoded.task_id).exists()
        )
        if known:
            outcome.skipped += 1
            if not dry_run:
                message.ack()
            if progress:
                progress("skipped", decoded)
            continue
        if dry_run:
            outcome.imported += 1
            if progress:
                progress("imported", decoded)
            continue
        letter = record(
            reason=BROKER,
            task_name=decoded.task_name,
            task_id=decoded.task_id,
            event_id=_event_id_of(decoded),
            args=decoded.args,
            kwargs=decoded.kwargs,
            body=decoded.body,
            headers=decoded.headers,
            exception=_BrokerDeath(decoded.why),
            attempts=decoded.deaths,
        )
        if letter is None:
            # Not stored: leave it (and what follows) in the queue for the next import.
            outcome.interrupted = True
            if progress:
                progress("failed", decoded)
            break
        message.ack()
        outcome.imported += 1
        outcome.letters.append(letter)
        if progress:
            progress("imported", decoded)
    return outcome


class _BrokerDeath(Exception):
    """Why the broker dead-lettered a message, as its ``x-death`` header tells it."""

    def __repr__(self) -> str:
        return str(self)


def decode_broker_message(message: Any) -> BrokerMessage:
    """The task name, id, arguments and death record of a Celery message (protocol 2 or 1)."""
    headers = dict(message.headers or {})
    task_name = str(headers.get("task") or "")
    task_id = str(headers.get("id") or "")
    args: Any = None
    kwargs: Any = None
    body = ""
    try:
        payload = message.decode()
    except Exception as exc:  # undecodable or refused content: keep the raw body instead
        payload = None
        body = f"{_raw(message.body)}\n({exc!r})"
    if isinstance(payload, list | tuple) and len(payload) == 3:  # protocol 2
        args, kwargs = list(payload[0] or ()), dict(payload[1] or {})
    elif isinstance(payload, dict) and "task" in payload:  # protocol 1
        task_name = task_name or str(payload.get("task") or "")
        task_id = task_id or str(payload.get("id") or "")
        args, kwargs = list(payload.get("args") or ()), dict(payload.get("kwargs") or {})
    elif payload is not None:
        body = _raw(message.body)
    deaths, why = _deaths(headers)
    return BrokerMessage(task_name, task_id, args, kwargs, body, headers, deaths, why)


def _deaths(headers: dict[str, Any]) -> tuple[int, str]:
    records = headers.get("x-death")
    if not isinstance(records, list) or not records:
        return 1, "dead-lettered by the broker"
    count = 0
    parts = []
    for death in records:
        if not isinstance(death, dict):
            continue
        times = death.get("count")
        times = times if isinstance(times, int) else 1
        count += times
        parts.append(
            f"{death.get('reason', '?')} from queue {death.get('queue', '?')!s} ({times}x)"
        )
    return max(1, count), "dead-lettered by the broker: " + "; ".join(parts)


def _event_id_of(message: BrokerMessage) -> str:
    from celery import current_app

    if not message.args:
        return ""
    task = current_app.tasks.get(message.task_name)
    # An @idempotent_task reads its own key; its class lives with the Celery integration,
    # which builds on this package, so it is known by the marker the system checks use too.
    if task is not None and getattr(task, "idempotent", False) is True:
        return str(task._event_id(message.args))  # type: ignore[attr-defined]
    try:
        from ..conf import app_settings
        from ..keys import extract_key

        return extract_key(message.args[0], app_settings.KEY)
    except Exception:  # not an event of ours: the row is kept without an event id
        return ""


def _raw(body: Any) -> str:
    if isinstance(body, bytes):
        return body.decode("utf-8", errors="replace")
    return str(body)
