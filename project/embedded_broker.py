"""kombu's filesystem transport for the embedded default, without its stall of one event a cycle.

Celery drives a polling transport with its blocking loop (``synloop``): it calls
``drain_events(timeout=2.0)``, and only between two calls does it perform the acknowledgements
that finished tasks left for it. With ``task_acks_late`` and a prefetch of one message per pool
process, the prefetch is full while tasks run, so the transport has nothing it may deliver and
waits out the whole two seconds; the acks wait with it, and the worker applies about one event
a second whatever the load. This transport returns after ``ack_interval`` (5 ms) when a
consumer's prefetch is full, so the loop acknowledges a finished task almost at once and takes
the next; a task of a few milliseconds no longer waits a whole polling interval (50 ms) for its
acknowledgement. Acknowledgements, rejections, prefetch and the delivery order are kombu's own:
only the waiting changes.

The transport has a URL scheme of its own, ``embedded://`` (:func:`register`, called by
project/celery.py), so the broker is chosen by ``CELERY_BROKER_URL`` alone: pointing the URL at
another broker is enough to leave it (``filesystem://`` is kombu's transport as it comes).
"""

from __future__ import annotations

from kombu import Connection
from kombu.transport import TRANSPORT_ALIASES, filesystem

#: The URL scheme of this transport.
SCHEME = "embedded"
#: Seconds the transport waits, with a full prefetch, before handing control back to Celery's
#: loop (transport option ``ack_interval``). Each wait costs a listing of the queue directory
#: (for the worker's remote-control queue), so it is not zero.
ACK_INTERVAL = 0.005


def register() -> None:
    """Make ``embedded://`` name this transport in kombu (and so in Celery)."""
    TRANSPORT_ALIASES.setdefault(SCHEME, f"{__name__}:Transport")


class Transport(filesystem.Transport):
    def __init__(self, client: Connection, **kwargs: object) -> None:
        super().__init__(client, **kwargs)
        self.ack_interval = float(
            (client.transport_options or {}).get("ack_interval", ACK_INTERVAL)
        )

    # (the stubs of kombu's two base classes disagree on this signature; the virtual one is right)
    def drain_events(  # type: ignore[override]
        self, connection: Connection, timeout: float | None = None
    ) -> None:
        if timeout is not None and any(
            channel._consumers and not channel.qos.can_consume() for channel in self.channels or ()
        ):
            # A consumer whose prefetch is full gets nothing more until the caller acknowledges
            # (the worker's remote-control channel may still be idle): hand control back, so the
            # acknowledgement a finished task left with the loop is performed now. kombu sleeps
            # min(polling interval, timeout) between two empty polls.
            timeout = min(timeout, self.ack_interval)
        super().drain_events(connection, timeout)
