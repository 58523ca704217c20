"""A NATS JetStream pull consumer with explicit acks (``pip install django-idempotency[nats]``).

Messages are fetched one at a time from a durable pull consumer whose ack policy is explicit;
each is processed by an :class:`~idempotency.consumers.EventConsumer` in Django's synchronous
world (``sync_to_async``, one thread, so the database connection is the same one every time)
and acknowledged with ``ack_sync`` (the server confirms it) only after the claim's transaction
committed. A message with no durable outcome is negatively acknowledged (``nak``) and
redelivered; one left unacknowledged (the process died) is redelivered after ``ack_wait``.

``ack_wait`` must outlast a message's processing, the transient wait included (the consumer's
``transient_window``): a message still in hand when it expires is delivered again to another
consumer of the same durable, which the inbox discards once the first commits.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

# The nats extra: without it, say which to install rather than fail on a bare import.
try:
    import nats
except ImportError as _exc:
    from ..extras import missing

    raise missing("nats", "idempotency.consumers.nats") from _exc
from asgiref.sync import sync_to_async
from django.db import connections
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import AckPolicy, ConsumerConfig

from .processing import Delivery, EventConsumer, Outcome

logger = logging.getLogger("idempotency")


def decode_json(data: bytes) -> Any:
    """The default decoder: the body is a UTF-8 JSON document."""
    return json.loads(data.decode("utf-8"))


class JetStreamConsumer:
    """Consume *subject* of *stream* through the durable pull consumer *durable*::

        events = EventConsumer(apply_payment, consumer="billing.payments")
        JetStreamConsumer(events, servers="nats://127.0.0.1:4222", stream="PAYMENTS",
                          subject="payments.received", durable="billing").run_sync(stop=stop)

    The durable consumer is created if it does not exist, with an explicit ack policy and
    *ack_wait* seconds. *decode* turns the body (bytes) into the event; a body it refuses is
    dead-lettered as ``undecodable``. *on_outcome* is called after each message is settled.
    """

    def __init__(
        self,
        consumer: EventConsumer,
        *,
        servers: str | Sequence[str],
        stream: str,
        subject: str,
        durable: str,
        ack_wait: float = 60.0,
        decode: Callable[[bytes], Any] = decode_json,
        on_outcome: Callable[[Outcome], None] | None = None,
        fetch_timeout: float = 1.0,
        connect_options: dict[str, Any] | None = None,
    ) -> None:
        for name, value in (("stream", stream), ("subject", subject), ("durable", durable)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} is required")
        if not 0 < ack_wait <= 86_400:
            raise ValueError("ack_wait must be a number of seconds from 0 to 86400")
        self.consumer = consumer
        self.servers = [servers] if isinstance(servers, str) else list(servers)
        self.stream = stream
        self.subject = subject
        self.durable = durable
        self.ack_wait = ack_wait
        self.decode = decode
        self.on_outcome = on_outcome
        self.fetch_timeout = fetch_timeout
        self.connect_options = connect_options or {}
        self.handled = 0
        self._stop = threading.Event()
        # thread_sensitive: every message runs in the same thread, with the same connection.
        self._process = sync_to_async(self.consumer.process, thread_sensitive=True)
        self._undecodable = sync_to_async(self.consumer.undecodable, thread_sensitive=True)

    def stop(self) -> None:
        """Stop after the message in hand (safe from a signal handler or another thread)."""
        self._stop.set()

    def run_sync(
        self,
        *,
        stop: threading.Event | None = None,
        limit: int | None = None,
        idle_timeout: float | None = None,
    ) -> int:
        """:meth:`run` in an event loop of its own, for a plain (synchronous) process."""
        return asyncio.run(self.run(stop=stop, limit=limit, idle_timeout=idle_timeout))

    async def run(
        self,
        *,
        stop: threading.Event | None = None,
        limit: int | None = None,
        idle_timeout: float | None = None,
    ) -> int:
        """Consume until stopped, *limit* messages settled, or *idle_timeout* seconds with none.

        Returns the number of messages settled (acknowledged or negatively acknowledged).
        """
        if stop is not None:
            self._stop = stop
        self.handled = 0
        connection = await nats.connect(servers=self.servers, **self.connect_options)
        try:
            jetstream = connection.jetstream()
            subscription = await jetstream.pull_subscribe(
                self.subject,
                durable=self.durable,
                stream=self.stream,
                config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, ack_wait=self.ack_wait),
            )
            idle_since = time.monotonic()
            while not self._stop.is_set() and (limit is None or self.handled < limit):
                try:
                    messages = await subscription.fetch(1, timeout=self.fetch_timeout)
                except NatsTimeout:
                    if idle_timeout is not None and time.monotonic() - idle_since >= idle_timeout:
                        break
                    continue
                for message in messages:
                    await self._settle(message)
                idle_since = time.monotonic()
        finally:
            # Every settled message was acknowledged with ack_sync (the server confirmed it):
            # nothing is left to flush, and a drain would wait out the pending pull request.
            await connection.close()
            # The thread the handler ran in keeps its database connection otherwise.
            await sync_to_async(connections.close_all, thread_sensitive=True)()
        return self.handled

    async def _settle(self, message: Msg) -> None:
        metadata = message.metadata
        headers = dict(message.headers or {})
        # The stream sequence names the message across redeliveries; a publisher's
        # Nats-Msg-Id (its de-duplication id) names it across re-publishes too.
        message_id = headers.get("Nats-Msg-Id") or f"{self.stream}:{metadata.sequence.stream}"
        redelivered = (metadata.num_delivered or 1) > 1
        raw = message.data.decode("utf-8", "backslashreplace")
        try:
            body = self.decode(message.data)
        except Exception as exc:
            outcome = await self._undecodable(
                Delivery(None, message_id, redelivered, headers, raw), exc
            )
        else:
            outcome = await self._process(Delivery(body, message_id, redelivered, headers, raw))
        if outcome.ack:
            await message.ack_sync()
        else:
            await message.nak()
        self.handled += 1
        if self.on_outcome is not None:
            self.on_outcome(outcome)
