"""kombu's filesystem transport for the embedded default, without its stall of one event a cycle.

Celery drives a polling transport with its blocking loop (``synloop``): it calls
``drain_events(timeout=2.0)``, and only between two calls does it perform the acknowledgements
that finished tasks left for it. With ``task_acks_late`` and a prefetch of one message per pool
process, the prefetch is full while tasks run, so the transport has nothing it may deliver and
waits out the whole two seconds; the acks wait with it, and the worker applies about one event
a second whatever the load. This transport returns after one polling interval when a consumer's
prefetch is full, so the loop acknowledges at once and takes the next. Acknowledgements,
prefetch and the delivery order are kombu's own: only the waiting changes.
"""

from __future__ import annotations

from kombu import Connection
from kombu.transport import filesystem


class Transport(filesystem.Transport):
    # (the stubs of kombu's two base classes disagree on this signature; the virtual one is right)
    def drain_events(  # type: ignore[override]
        self, connection: Connection, timeout: float | None = None
    ) -> None:
        if timeout is not None and any(
            channel._consumers and not channel.qos.can_consume() for channel in self.channels or ()
        ):
            # A consumer whose prefetch is full gets nothing more until the caller acknowledges
            # (the worker's remote-control channel may still be idle): hand control back.
            timeout = min(timeout, self.polling_interval or timeout)
        super().drain_events(connection, timeout)
