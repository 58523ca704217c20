"""Fault hooks, loaded into a real worker with ``celery worker --include tests.faults.hooks``.

They do nothing unless the worker's environment names a directory in ``FAULTS_DIR``, which the
test and the worker's processes share:

``plan/<event id>@<point>``
    A fault the test armed; the file holds its action, ``pause`` or ``kill``.
``fired/<event id>@<point>``
    Created exclusively when the fault fires, so it fires once across every process: the
    redelivery that follows goes through.
``paused/<event id>@<point>``
    Written by a paused delivery: its pid, its worker's pid and its PostgreSQL backend pid.
``release/<event id>@<point>``
    Written by the test to let the paused delivery go on.
``fail/<event id>``
    While it exists, the handler raises :class:`InjectedFailure` for that event on every
    delivery: an error ``idempotent_task`` does not retry, so the task fails for good and becomes
    a dead letter. Deleting the file is the "fix" before a re-drive.
``raise-on-duplicate/<event id>``
    While it exists, a ``duplicate_discarded`` receiver raises :class:`InjectedFailure` for each
    duplicate of that event (a project's receiver with a bug in it), journalled ``raised``.
``slow/<event id>``
    While it exists, the handler of that event sleeps ``FAULTS_SLOW_SECONDS`` (60) on every
    delivery, journalled ``slow``, swallowing the soft time limit (``soft-limit``): past a
    small hard time limit, each delivery is killed.
``journal.log``
    One line per observation, appended by every process: ``received``, ``finished``,
    ``applied``, ``discarded`` (by the inbox), ``kept`` (by the entity key after an inbox
    record was purged), ``killed``, ``paused``, ``failed`` (an injected failure), ``raised``
    (a raising receiver), ``slow``, ``unsafe`` (a claim that was not its connection's one
    transaction when it was processed: ``Scenario.verify`` fails on any).

The points, in the order a first delivery reaches them:

``popped``
    Redis only, ``kill`` only: the worker's main process has popped the message off the
    queue's list and not yet recorded it in kombu's ``unacked`` hash (the transport's second
    round trip, celery/celery#7950). A kill there loses the message in the broker for good;
    only the outbox reconciler brings it back.
``handler``
    The event is claimed, its transaction open, the business logic not yet run.
``before-commit``
    The business logic ran; the claim and its writes are about to commit
    (:data:`idempotency.signals.event_processed`).
``after-commit``
    The transaction committed; the message is not acknowledged yet (``on_commit``).

One more point, named by the event id of an *outgoing* message (an outbox row's ``event_id``,
such as the OrderPlaced id a PlaceOrder derives):

``before-publish``
    ``kill`` only: the transaction that stored the outbox row committed, and the publish after
    the commit (``idempotency.outbox.store.publish_now``) is about to run. The row stays
    pending; only the relay publishes it.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from celery import signals as celery_signals
from celery.exceptions import SoftTimeLimitExceeded
from django.db import connections, transaction
from django.dispatch import receiver

from idempotency import signals
from orders import services
from tests.faults import consumers

POINTS = ("handler", "before-commit", "after-commit", "before-publish")
ACTIONS = ("pause", "kill")

#: The longest a paused delivery waits for its release before it fails (and the test with it).
PAUSE_LIMIT = float(os.environ.get("FAULTS_PAUSE_LIMIT", "180"))
#: How long a ``slow/<event id>`` handler sleeps: far past any time limit a scenario sets.
SLOW_SECONDS = float(os.environ.get("FAULTS_SLOW_SECONDS", "60"))


class FaultPauseExpired(RuntimeError):
    """A paused delivery was never released: the test that paused it has gone wrong."""


class InjectedFailure(RuntimeError):
    """A handler failing for an event the test marked with ``fail/<event id>`` (a poison)."""


def faults_dir() -> Path | None:
    value = os.environ.get("FAULTS_DIR")
    return Path(value) if value else None


def fault_name(event_id: str, point: str) -> str:
    return f"{event_id}@{point}"


def journal(kind: str, consumer: str, event_id: str, detail: str = "") -> None:
    """Append one line; a single small ``O_APPEND`` write is atomic across processes."""
    base = faults_dir()
    if base is None:
        return
    line = f"{kind} {consumer} {event_id} {os.getpid()} {detail}".rstrip() + "\n"
    fd = os.open(base / "journal.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def _claim_fired(base: Path, name: str) -> bool:
    """True for the one process that fires this fault."""
    (base / "fired").mkdir(exist_ok=True)
    try:
        fd = os.open(base / "fired" / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    os.close(fd)
    return True


def _backend_pid(using: str) -> int | None:
    connection = connections[using]
    if connection.vendor != "postgresql" or connection.connection is None:
        return None
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        row = cursor.fetchone()
    return int(row[0]) if row else None


def fire(event_id: str, point: str, consumer: str = "", using: str = "default") -> None:
    """Carry out the fault armed for *event_id* at *point*, once."""
    base = faults_dir()
    if base is None:
        return
    name = fault_name(event_id, point)
    plan = base / "plan" / name
    if not plan.exists() or not _claim_fired(base, name):
        return
    action = plan.read_text().strip()
    if action == "kill":
        journal("killed", consumer, event_id, point)
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "pause":
        _pause(base, name, event_id, point, consumer, using)
    else:
        raise ValueError(f"unknown fault action {action!r} in {plan}")


def _pause(base: Path, name: str, event_id: str, point: str, consumer: str, using: str) -> None:
    state = {
        "pid": os.getpid(),
        "worker_pid": os.getppid(),
        "backend_pid": _backend_pid(using),
        "consumer": consumer,
        "point": point,
    }
    (base / "paused").mkdir(exist_ok=True)
    tmp = base / "paused" / f".{name}.tmp"
    tmp.write_text(json.dumps(state))
    tmp.rename(base / "paused" / name)  # atomic: the test never reads half a file
    journal("paused", consumer, event_id, point)
    release = base / "release" / name
    deadline = time.monotonic() + PAUSE_LIMIT
    while not release.exists():
        if time.monotonic() > deadline:
            raise FaultPauseExpired(f"{name} was not released within {PAUSE_LIMIT:.0f}s")
        time.sleep(0.02)


def _event_id_of(args: Any) -> str:
    if args and isinstance(args[0], dict):
        return str(args[0].get("eventId", ""))
    return ""


# --- Observations ----------------------------------------------------------------------------


@celery_signals.task_prerun.connect(weak=False)
def _received(sender: Any = None, task_id: str = "", args: Any = None, **kwargs: Any) -> None:
    journal("received", getattr(sender, "name", "?"), _event_id_of(args), task_id)


@celery_signals.task_postrun.connect(weak=False)
def _finished(sender: Any = None, args: Any = None, state: str = "", **kwargs: Any) -> None:
    journal("finished", getattr(sender, "name", "?"), _event_id_of(args), state or "")


@receiver(signals.event_processed, weak=False)
def _processed(consumer: str, event_id: str, record: Any, **kwargs: Any) -> None:
    using = record._state.db or "default"
    # A worker's claim is its connection's only transaction: one atomic block, not in
    # autocommit. Anything else (a block an earlier task left open, a connection that lost its
    # transaction) would commit this effect apart from its claim, or never.
    conn = connections[using]
    depth = len(conn.atomic_blocks)
    if depth != 1 or conn.get_autocommit():
        journal("unsafe", consumer, event_id, f"atomic-depth={depth}")
    fire(event_id, "before-commit", consumer, using)
    outcome = str(record.outcome)

    def committed() -> None:
        # Journal first: a kill armed at after-commit must not hide the effect it follows.
        journal("applied", consumer, event_id, outcome)
        fire(event_id, "after-commit", consumer, using)

    transaction.on_commit(committed, using=using)


@receiver(signals.duplicate_discarded, weak=False)
def _discarded(consumer: str, event_id: str, record: Any, **kwargs: Any) -> None:
    using = record._state.db or "default"
    transaction.on_commit(lambda: journal("discarded", consumer, event_id), using=using)


def _marked(kind: str, event_id: str) -> bool:
    base = faults_dir()
    return base is not None and bool(event_id) and (base / kind / event_id).exists()


# Connected after _discarded: Django calls receivers in order, so the journal's on_commit is
# registered first and a rollback caused by this one takes it away.
@receiver(signals.duplicate_discarded, weak=False)
def _raise_on_duplicate(consumer: str, event_id: str, **kwargs: Any) -> None:
    if _marked("raise-on-duplicate", event_id):
        journal("raised", consumer, event_id)
        raise InjectedFailure(f"a duplicate_discarded receiver failed for {consumer} {event_id}")


# --- Patches of the example's business logic -------------------------------------------------


def fail_if_marked(event_id: str, consumer: str) -> None:
    """Raise :class:`InjectedFailure` while ``fail/<event id>`` exists."""
    base = faults_dir()
    if base is None or not event_id or not (base / "fail" / event_id).exists():
        return
    journal("failed", consumer, event_id)
    raise InjectedFailure(f"injected failure of {consumer} for event {event_id}")


def sleep_if_marked(event_id: str, consumer: str) -> None:
    """Sleep :data:`SLOW_SECONDS` while ``slow/<event id>`` exists: a handler that hangs.

    It swallows the soft time limit, as code stuck in a blocking call or behind a broad
    ``except`` does, so only the hard time limit ends it.
    """
    if not _marked("slow", event_id):
        return
    journal("slow", consumer, event_id)
    deadline = time.monotonic() + SLOW_SECONDS
    while time.monotonic() < deadline:
        try:
            time.sleep(max(0.0, deadline - time.monotonic()))
        except SoftTimeLimitExceeded:
            journal("soft-limit", consumer, event_id)


def _at_handler(consumer: str, function: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(function)
    def wrapper(event: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        event_id = str(event.get("eventId", ""))
        fire(event_id, "handler", consumer)
        fail_if_marked(event_id, consumer)
        sleep_if_marked(event_id, consumer)
        return function(event, *args, **kwargs)

    return wrapper


def _observed_create_once(function: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(function)
    def wrapper(model: Any, original_event_id: Any, *args: Any, **kwargs: Any) -> Any:
        row, created = function(model, original_event_id, *args, **kwargs)
        if not created:
            label = model._meta.label
            transaction.on_commit(lambda: journal("kept", label, str(original_event_id)))
        return row, created

    return wrapper


def _popped_event(message: Any) -> tuple[str, str]:
    """(task name, event id) of a kombu message, or empty strings if it is not a task's."""
    try:
        args = message.decode()[0]  # task protocol 2: (args, kwargs, embed)
        return str((message.headers or {}).get("task", "")), _event_id_of(args)
    except Exception:  # a poison message of a scenario: no fault to fire for it
        return "", ""


def _kill_between_pop_and_unacked(append: Callable[..., Any]) -> Callable[..., Any]:
    """kombu's Redis ``QoS.append``, run right after the pop: a ``popped`` fault fires first."""

    @functools.wraps(append)
    def wrapper(self: Any, message: Any, delivery_tag: Any) -> Any:
        task, event_id = _popped_event(message)
        if event_id:
            fire(event_id, "popped", task)
        return append(self, message, delivery_tag)

    return wrapper


def _kill_before_publish(publish_now: Callable[..., Any]) -> Callable[..., Any]:
    """The outbox's publish after commit: a ``before-publish`` fault of a row fires first."""

    @functools.wraps(publish_now)
    def wrapper(ids: Any, *args: Any, **kwargs: Any) -> Any:
        base = faults_dir()
        # Only a scenario that armed the point pays for the read.
        if base is not None and any((base / "plan").glob("*@before-publish")):
            from idempotency.models import OutboxMessage

            rows = OutboxMessage.objects.using(kwargs.get("using") or "default").filter(pk__in=ids)
            for event_id, task in rows.values_list("event_id", "task_name"):
                if event_id:
                    fire(str(event_id), "before-publish", str(task))
        return publish_now(ids, *args, **kwargs)

    return wrapper


def install() -> None:
    """Patch the business logic once per process (the pool's children inherit it)."""
    if getattr(services, "_fault_hooks_installed", False):
        return
    from kombu.transport import redis as redis_transport

    redis_transport.QoS.append = _kill_between_pop_and_unacked(redis_transport.QoS.append)  # type: ignore[method-assign]
    from idempotency.outbox import store as outbox_store

    outbox_store.publish_now = _kill_before_publish(outbox_store.publish_now)  # type: ignore[assignment]
    for name in (
        "place_order",
        "payment_received",
        "debit_account",
        "ship_order",
        "send_order_confirmation",
    ):
        setattr(services, name, _at_handler(f"orders.tasks.{name}", getattr(services, name)))
    services.create_once = _observed_create_once(services.create_once)  # type: ignore[assignment]
    consumers.record_audit = _at_handler(consumers.CONSUMER, consumers.record_audit)  # type: ignore[assignment]
    services._fault_hooks_installed = True  # type: ignore[attr-defined]


install()
