"""Every error the app raises derives from :class:`IdempotencyError`.

Each subclass also inherits the built-in exception it is a kind of, so callers that already
catch ``ValueError`` or ``ImproperlyConfigured`` keep working.
"""

from __future__ import annotations

from django.core.exceptions import ImproperlyConfigured


class IdempotencyError(Exception):
    """Root of the app's exception tree."""


class IdempotencyConfigurationError(IdempotencyError, ImproperlyConfigured):
    """The ``IDEMPOTENCY`` settings dict or a decorator's arguments are invalid."""


class InvalidConsumerName(IdempotencyConfigurationError, ValueError):
    """A consumer name the inbox cannot store: not a string, empty, longer than 200 characters
    (the column's length), or holding a NUL or a lone surrogate (no database takes either).

    Raised by ``idempotent()``/``claim()`` before any query, instead of a driver's error.
    """


class MissingExtra(IdempotencyConfigurationError, ImportError):
    """An optional dependency is not installed; the message names the extra that installs it.

    Also an :class:`ImportError`, so code that probes with ``except ImportError`` still works.
    """


class InvalidEventId(IdempotencyError, ValueError):
    """The event's idempotency key cannot be used (too long, or not a scalar).

    Such a message can never succeed, so the Celery wrapper rejects it without requeueing.
    """


class MissingEventId(InvalidEventId):
    """The event carries no idempotency key at all (absent, ``None`` or empty)."""


class InvalidEvent(IdempotencyError, ValueError):
    """The event itself cannot be fingerprinted or stored: nested too deeply, too large, or
    holding a value with no JSON form. Such a message can never succeed: it is dead-lettered.
    """


class ResultNotSerializable(IdempotencyError, TypeError):
    """A handler's result (or a stored payload) has no JSON form under the result serializer."""


class AfterCommitError(IdempotencyError):
    """The claim's transaction committed, then an ``on_commit`` callback raised.

    The event was applied and its inbox record is durable: the delivery is done, not failed.
    The callback's exception is the ``__cause__``.
    """

    def __init__(self, consumer: str, event_id: str) -> None:
        self.consumer = consumer
        self.event_id = event_id
        super().__init__(
            f"event {event_id!r} for consumer {consumer!r} was applied and committed, "
            "then an on_commit callback raised"
        )

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        return (type(self), (self.consumer, self.event_id))


class TransactionRequired(IdempotencyError, RuntimeError):
    """A claim was attempted outside ``transaction.atomic()``.

    The claim only protects the business change when both commit together.
    """


class PayloadMismatch(IdempotencyError, ValueError):
    """An event id was seen before with a different payload.

    Usually a producer bug: it reused an id for a different event.
    """

    def __init__(self, consumer: str, event_id: str, stored: str, received: str) -> None:
        self.consumer = consumer
        self.event_id = event_id
        self.stored_fingerprint = stored
        self.received_fingerprint = received
        super().__init__(
            f"event {event_id!r} for consumer {consumer!r} was processed with payload "
            f"fingerprint {stored[:12]}, but this delivery has {received[:12]}"
        )

    def __reduce__(self) -> tuple[type, tuple[str, str, str, str]]:
        # Pickles intact, so Celery can store and re-raise it with its fields.
        return (
            type(self),
            (self.consumer, self.event_id, self.stored_fingerprint, self.received_fingerprint),
        )


class InvalidIdempotencyKey(IdempotencyError, ValueError):
    """An HTTP ``Idempotency-Key`` header that cannot be used (empty, too long, not ASCII)."""


class MissingIdempotencyKey(InvalidIdempotencyKey):
    """An endpoint that requires an ``Idempotency-Key`` header was called without one."""


class IdempotencyKeyInUse(IdempotencyError):
    """A request with this ``Idempotency-Key`` is still being processed."""

    def __init__(self, key: str, retry_after: int) -> None:
        self.key = key
        self.retry_after = retry_after
        super().__init__(f"a request with idempotency key {key!r} is still in progress")


class IdempotencyKeyReused(IdempotencyError, ValueError):
    """An ``Idempotency-Key`` was sent again with a different request (method, path or body)."""

    def __init__(self, key: str) -> None:
        self.key = key
        super().__init__(f"idempotency key {key!r} was already used for a different request")
