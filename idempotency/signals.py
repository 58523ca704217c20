"""Signals sent by the claim primitive. Receivers run inside the claim's transaction."""

from django.dispatch import Signal

#: Sent after a handler ran for the first delivery of an event.
#: Arguments: ``sender`` (ProcessedEvent class), ``consumer``, ``event_id``, ``record``.
event_processed = Signal()

#: Sent when a delivery is recognised as a duplicate and its handler is skipped.
#: Arguments: ``sender``, ``consumer``, ``event_id``, ``record`` (the original ProcessedEvent).
duplicate_discarded = Signal()

#: Sent when a duplicate's payload fingerprint differs from the stored one.
#: Arguments: ``sender``, ``consumer``, ``event_id``, ``record``, ``stored_fingerprint``,
#: ``received_fingerprint``.
payload_mismatch = Signal()

#: Sent after :data:`event_processed` when the handler ended with a rejected (final, negative)
#: outcome, see :func:`idempotency.inbox.reject`.
#: Arguments: ``sender``, ``consumer``, ``event_id``, ``record``, ``reason``.
event_rejected = Signal()

#: Sent by a purge after each batch has committed, outside any transaction of the purge's own.
#: Arguments: ``sender`` (ProcessedEvent class), ``count`` (records deleted by the batch),
#: ``using`` (the database alias).
events_purged = Signal()

#: Sent by the outbox reconciler for a message it published again because no outcome of its
#: event was seen, inside the transaction that records the republish.
#: Arguments: ``sender`` (OutboxMessage class), ``consumer``, ``count``, ``using``.
outbox_republished = Signal()

#: Sent by the outbox reconciler for a message it marked failed: still no outcome after
#: ``RECONCILE_REPUBLISHES`` republishes. Arguments as for :data:`outbox_republished`.
outbox_unresolved = Signal()
