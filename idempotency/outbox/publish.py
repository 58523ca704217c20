"""The immediate publish after a commit: bounded, pooled, behind a circuit breaker.

One short attempt (``PUBLISH_TIMEOUT``) for the messages a transaction stored, skipped while a
recent failure keeps the process's breaker open (``PUBLISH_BREAKER_COOLDOWN``); the relay
publishes whatever it misses.
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
import os
import threading
import time
from collections.abc import Sequence
from typing import Any

from celery import current_app
from django.db import DatabaseError, router
from django.db.models import F

from ..conf import app_settings
from .relaying import describe, is_outage, relay_messages

logger = logging.getLogger("idempotency")

#: Idle broker connections the immediate publish keeps per process, for the next commits.
IDLE_CONNECTIONS = 8


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
