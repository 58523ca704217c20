"""A plain ``kombu.Consumer`` loop (RabbitMQ, Redis, SQS) with no Celery worker.

Each message is decoded, processed by an :class:`~idempotency.consumers.EventConsumer` (claim and
effect in one transaction) and acknowledged only after that transaction commits; a message
with no durable outcome is requeued. The channel's prefetch is one message, so a stop (SIGTERM)
finishes the message in hand, acknowledges it and leaves the rest with the broker.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

# The kombu extra (celery brings kombu too): without it, say so rather than fail on a bare import.
try:
    from kombu import Connection, Consumer, Queue
    from kombu.message import Message
except ImportError as _exc:
    from ..extras import missing

    raise missing("kombu", "idempotency.consumers.KombuConsumer") from _exc

from .processing import Delivery, EventConsumer, Outcome

logger = logging.getLogger("idempotency")

#: The longest wait between reconnections while the broker is away.
MAX_RECONNECT_BACKOFF = 30.0


class KombuConsumer:
    """Consume *queues* on *connection* (a ``kombu.Connection`` or its URL) with *consumer*::

        events = EventConsumer(apply_payment, consumer="billing.payments")
        KombuConsumer("amqp://...", ["payments"], events).run(stop=stop_event)

    *queues* are ``kombu.Queue`` objects or queue names (declared durable on a direct exchange
    of the same name, as kombu does for a bare name). *accept* lists the content types decoded
    (``json`` only by default: a pickle is never unpickled from a broker); any other message is
    dead-lettered as ``undecodable``. *on_outcome* is called after each message is settled.
    *transport* (a kombu transport alias or a ``"module:Class"`` path, by default the URL's
    scheme) and *transport_options* (``{"visibility_timeout": 60}`` on Redis or SQS) go to the
    connection made from a URL; a ``kombu.Connection`` you pass carries its own.
    """

    def __init__(
        self,
        connection: Connection | str,
        queues: Sequence[Queue | str],
        consumer: EventConsumer,
        *,
        accept: Sequence[str] = ("json",),
        on_outcome: Callable[[Outcome], None] | None = None,
        poll_interval: float = 1.0,
        transport: str | None = None,
        transport_options: dict[str, Any] | None = None,
    ) -> None:
        if not queues:
            raise ValueError("at least one queue is required")
        #: A connection made from a URL is this consumer's own, released when it stops.
        self._owned = isinstance(connection, str)
        if isinstance(connection, str):
            self.connection = Connection(
                connection, transport=transport, transport_options=dict(transport_options or {})
            )
        elif transport or transport_options:
            # Changing a caller's connection would change it for everyone who shares it.
            raise TypeError("pass transport and transport_options to your kombu.Connection")
        else:
            self.connection = connection
        self.queues = [q if isinstance(q, Queue) else Queue(q, durable=True) for q in queues]
        self.consumer = consumer
        self.accept = list(accept)
        self.on_outcome = on_outcome
        self.poll_interval = poll_interval
        self.handled = 0
        self._stop = threading.Event()
        self._limit: int | None = None

    def stop(self) -> None:
        """Stop after the message in hand (safe from a signal handler or another thread)."""
        self._stop.set()

    def run(
        self,
        *,
        stop: threading.Event | None = None,
        limit: int | None = None,
        idle_timeout: float | None = None,
    ) -> int:
        """Consume until stopped, *limit* messages settled, or *idle_timeout* seconds with none.

        A lost broker connection is re-established with capped backoff; the message in hand
        then was not acknowledged and comes back (a duplicate the inbox discards if it had
        committed). Returns the number of messages settled (acknowledged or requeued).
        """
        if stop is not None:
            self._stop = stop
        self._limit = limit
        self.handled = 0
        backoff = 1.0
        try:
            self._reconnecting(idle_timeout, backoff)
        finally:
            if self._owned:
                with contextlib.suppress(Exception):
                    self.connection.release()
        return self.handled

    #: The same name as :meth:`JetStreamConsumer.run_sync`, so a runner takes either.
    run_sync = run

    def _reconnecting(self, idle_timeout: float | None, backoff: float) -> None:
        while not self._done():
            try:
                self._consume(idle_timeout)
                return
            except self.connection.recoverable_connection_errors as exc:
                logger.warning(
                    "%s: broker connection lost (%r); reconnecting in %.0f s",
                    self.consumer.consumer,
                    exc,
                    backoff,
                )
                if self._stop.wait(backoff):
                    return
                backoff = min(MAX_RECONNECT_BACKOFF, backoff * 2)
                with contextlib.suppress(Exception):  # the old one is broken anyway
                    self.connection.release()
                self.connection = self.connection.clone()

    def _done(self) -> bool:
        return self._stop.is_set() or (self._limit is not None and self.handled >= self._limit)

    def _consume(self, idle_timeout: float | None) -> None:
        connection = self.connection
        connection.ensure_connection(max_retries=1)
        channel = connection.channel()
        consumer = Consumer(
            channel, queues=self.queues, on_message=self._on_message, accept=self.accept
        )
        # One unacknowledged message at a time: a stop or a crash leaves the rest queued.
        consumer.qos(prefetch_count=1)
        idle_since = time.monotonic()
        with consumer:
            while not self._done():
                before = self.handled
                with contextlib.suppress(TimeoutError):  # socket.timeout: nothing came
                    connection.drain_events(timeout=self.poll_interval)
                if self.handled != before:
                    idle_since = time.monotonic()
                elif idle_timeout is not None and time.monotonic() - idle_since >= idle_timeout:
                    return
        channel.close()  # type: ignore[attr-defined]  # every transport's channel has close()

    def _on_message(self, message: Message) -> None:
        if self._done():
            # A message the broker sent after a stop or the limit (one drain may deliver more
            # than one): back untouched, for the next consumer.
            message.requeue()
            return
        info = message.delivery_info or {}
        properties = message.properties or {}
        headers = dict(message.headers or {})
        message_id = str(properties.get("message_id") or headers.get("id") or "")
        raw = _raw(message)
        try:
            body = message.decode()
        except Exception as exc:
            delivery = Delivery(None, message_id, bool(info.get("redelivered")), headers, raw)
            outcome = self.consumer.undecodable(delivery, exc)
        else:
            delivery = Delivery(body, message_id, bool(info.get("redelivered")), headers, raw)
            outcome = self.consumer.process(delivery)
        if outcome.ack:
            message.ack()
        else:
            message.requeue()
        self.handled += 1
        if self.on_outcome is not None:
            self.on_outcome(outcome)


def _raw(message: Message) -> str:
    body: Any = message.body
    if isinstance(body, bytes | bytearray | memoryview):
        return bytes(body).decode("utf-8", "backslashreplace")
    return body if isinstance(body, str) else repr(body)
