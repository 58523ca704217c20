"""Helpers for testing consumers built on django-idempotency.

Deliver the same event to a handler twice at once, on two real database connections, or again
after a simulated crash inside its transaction; then assert what was applied::

    from idempotency.testing import assert_applied_once, deliver_after_crash, deliver_concurrently

    outcome = deliver_concurrently(place_order, event)        # a Celery task or any callable
    outcome.assert_applied_once()
    assert_applied_once("orders.tasks.place_order", event["eventId"])

The functions raise ``AssertionError``, so they work in pytest and in Django's test cases alike;
``idempotency.testing.pytest_plugin`` (registered as a pytest plugin) offers them as fixtures.
This module imports neither pytest nor, until called, Django's models.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Deliveries",
    "Delivery",
    "SimulatedCrash",
    "applied_count",
    "assert_applied_once",
    "assert_not_applied",
    "deliver",
    "deliver_after_crash",
    "deliver_concurrently",
]


class SimulatedCrash(BaseException):
    """What a worker killed just before COMMIT leaves: the delivery's transaction rolled back.

    A ``BaseException``, like the signal that kills a worker, so no ``except Exception`` on the
    way catches it.
    """


@dataclass
class Delivery:
    """One delivery of the event: what the handler returned, or what it raised."""

    result: Any = None
    error: BaseException | None = None
    #: Claims this delivery committed: first deliveries applied, duplicates skipped.
    processed: int = 0
    discarded: int = 0


@dataclass
class Deliveries:
    """The deliveries of one event, in the order they were started."""

    deliveries: list[Delivery] = field(default_factory=list)

    @property
    def processed(self) -> int:
        """Deliveries that applied the event (the handler ran and its claim committed)."""
        return sum(d.processed for d in self.deliveries)

    @property
    def discarded(self) -> int:
        """Deliveries recognised as duplicates."""
        return sum(d.discarded for d in self.deliveries)

    @property
    def errors(self) -> list[BaseException]:
        return [d.error for d in self.deliveries if d.error is not None]

    def assert_applied_once(self, *, allow_errors: bool = False) -> None:
        """Exactly one delivery applied the event; every other one that ended was a duplicate."""
        unexpected = [e for e in self.errors if not isinstance(e, SimulatedCrash)]
        if unexpected and not allow_errors:
            raise AssertionError(f"a delivery raised: {unexpected[0]!r}") from unexpected[0]
        if self.processed != 1:
            raise AssertionError(
                f"the event was applied {self.processed} times by {len(self.deliveries)} "
                f"deliveries, not once ({self.discarded} discarded as duplicates)"
            )
        ended = sum(1 for d in self.deliveries if d.error is None)
        if self.processed + self.discarded != ended:
            raise AssertionError(
                f"{ended} deliveries ended, but {self.processed} applied the event and "
                f"{self.discarded} were discarded as duplicates"
            )


_current = threading.local()


def _on_processed(**kwargs: Any) -> None:
    delivery = getattr(_current, "delivery", None)
    if delivery is not None:
        delivery.processed += 1


def _on_discarded(**kwargs: Any) -> None:
    delivery = getattr(_current, "delivery", None)
    if delivery is not None:
        delivery.discarded += 1


_receivers_lock = threading.Lock()
_receivers_users = 0


@contextmanager
def _counting() -> Iterator[None]:
    """Count each delivery's claims through the app's signals while the block runs.

    Racing deliveries share one connection of the receivers: the first to leave must not
    disconnect them under the others.
    """
    global _receivers_users
    from idempotency import signals

    pairs = [(signals.event_processed, _on_processed), (signals.duplicate_discarded, _on_discarded)]
    with _receivers_lock:
        if not _receivers_users:
            for signal, receiver in pairs:
                signal.connect(
                    receiver, weak=False, dispatch_uid=f"idempotency.testing.{id(receiver)}"
                )
        _receivers_users += 1
    try:
        yield
    finally:
        with _receivers_lock:
            _receivers_users -= 1
            if not _receivers_users:
                for signal, receiver in pairs:
                    signal.disconnect(receiver, dispatch_uid=f"idempotency.testing.{id(receiver)}")


def _call(handler: Any, event: Any) -> Any:
    # A Celery task runs as a worker would run it (the task's wrapper, its retries and dead
    # letters), in this thread; anything else is called with the event.
    if callable(getattr(handler, "apply", None)) and hasattr(handler, "apply_async"):
        return handler.apply(args=[event], throw=True).result
    return handler(event)


def deliver(handler: Any, event: Any) -> Delivery:
    """Deliver *event* to *handler* once, in this thread; what it raised is kept, not raised."""
    delivery = Delivery()
    _current.delivery = delivery
    try:
        with _counting():
            delivery.result = _call(handler, copy.deepcopy(event))
    except BaseException as exc:  # a SimulatedCrash too: it is the outcome under test
        delivery.error = exc
        delivery.processed = delivery.discarded = 0  # rolled back: nothing it claimed stayed
    finally:
        _current.delivery = None
    return delivery


def deliver_concurrently(
    handler: Any, event: Any, *, times: int = 2, timeout: float = 60
) -> Deliveries:
    """Deliver *event* to *handler* *times* times at once, each on a thread and connection.

    The threads start together (a barrier), so their claims race for the inbox's unique index
    as two workers' would. The data must be committed for the other connections to see it:
    run it in a transactional test (``TransactionTestCase``,
    ``pytest.mark.django_db(transaction=True)``), not inside ``TestCase``'s transaction.
    """
    from django.db import connections

    if times < 2:
        raise ValueError("deliver_concurrently needs at least two deliveries")
    if any(c.in_atomic_block for c in connections.all(initialized_only=True)):
        raise RuntimeError(
            "deliver_concurrently() runs inside a transaction that the other connections "
            "cannot see: use a transactional test (TransactionTestCase, "
            "django_db(transaction=True))"
        )
    barrier = threading.Barrier(times)
    outcome = Deliveries([Delivery() for _ in range(times)])

    def run(index: int) -> None:
        try:
            barrier.wait(timeout)
            outcome.deliveries[index] = deliver(handler, event)
        except BaseException as exc:
            outcome.deliveries[index].error = exc
        finally:
            connections.close_all()  # this thread's own connections

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(times)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    if any(thread.is_alive() for thread in threads):
        raise AssertionError(f"a delivery was still running after {timeout} s (a deadlock?)")
    return outcome


def deliver_after_crash(handler: Any, event: Any, *, using: str | None = None) -> Deliveries:
    """Deliver *event*, crash it at its commit, then deliver it again, as a broker would.

    The first delivery runs normally until its transaction on the inbox's database (*using*:
    by default the router's write alias for ``ProcessedEvent``) is about to commit; there it is
    rolled back, ``on_commit`` callbacks dropped, and :class:`SimulatedCrash` raised: what a
    worker killed before COMMIT leaves. Inside ``TestCase`` the delivery's outermost savepoint
    stands for its transaction. The second delivery is an ordinary one.
    """
    from django.db import connections, router

    from idempotency.models import ProcessedEvent

    connection = connections[using or router.db_for_write(ProcessedEvent)]
    depth = len(connection.savepoint_ids)
    in_test_transaction = connection.in_atomic_block
    crashed: list[bool] = []
    real_commit, real_savepoint_commit = connection.commit, connection.savepoint_commit

    def restore() -> None:
        connection.commit = real_commit  # type: ignore[method-assign]
        connection.savepoint_commit = real_savepoint_commit  # type: ignore[method-assign]

    def crash_commit() -> None:
        restore()
        crashed.append(True)
        connection.rollback()
        raise SimulatedCrash("the worker died before COMMIT (simulated)")

    def crash_savepoint_commit(sid: str) -> None:
        # Atomic pops its savepoint before releasing it: at the delivery's own depth this is
        # its outermost savepoint; deeper ones are the handler's and commit as usual.
        if len(connection.savepoint_ids) != depth:
            real_savepoint_commit(sid)
            return
        restore()
        crashed.append(True)
        connection.savepoint_rollback(sid)
        raise SimulatedCrash("the worker died before COMMIT (simulated)")

    if in_test_transaction:
        connection.savepoint_commit = crash_savepoint_commit  # type: ignore[method-assign]
    else:
        connection.commit = crash_commit  # type: ignore[method-assign]
    try:
        first = deliver(handler, event)
    finally:
        restore()
    if not crashed:
        raise AssertionError(
            f"the first delivery never committed a transaction on {connection.alias!r}, so "
            f"there was nothing to crash (it returned {first.result!r}, raised {first.error!r})"
        )
    if not isinstance(first.error, SimulatedCrash):
        raise AssertionError(f"the crash was caught on its way out: {first.error!r}")
    return Deliveries([first, deliver(handler, event)])


def applied_count(consumer: str, event_id: Any) -> int:
    """How many inbox records *consumer* holds for *event_id* (0 or 1: the table is unique)."""
    from idempotency.keys import event_id_key
    from idempotency.models import ProcessedEvent

    return ProcessedEvent.objects.for_consumer(consumer).for_event(event_id_key(event_id)).count()


def assert_applied_once(consumer: str, event_id: Any) -> None:
    """*consumer* has applied *event_id*: its inbox record exists (it exists exactly once)."""
    if applied_count(consumer, event_id) != 1:
        raise AssertionError(f"{consumer} has not applied event {event_id!r}: no inbox record")


def assert_not_applied(consumer: str, event_id: Any) -> None:
    """*consumer* has no record of *event_id*: a rolled-back delivery left nothing behind."""
    if applied_count(consumer, event_id):
        raise AssertionError(f"{consumer} has applied event {event_id!r}: its record exists")
