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
