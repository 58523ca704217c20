"""The app's settings: one ``IDEMPOTENCY = {...}`` dict, read when needed, never at import.

``app_settings.RETENTION`` returns the user's value or the default. The cache is dropped on
``setting_changed`` so ``override_settings(IDEMPOTENCY=...)`` works in tests.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.conf import settings
from django.core.signals import setting_changed
from django.dispatch import receiver

from .exceptions import IdempotencyConfigurationError

#: The accepted keys and their defaults; the docs' settings table mirrors this.
DEFAULTS: dict[str, Any] = {
    # How long a ProcessedEvent is kept. Must outlast every redelivery: the broker's
    # visibility timeout, the longest retry delay and a producer's re-publish window.
    "RETENTION": timedelta(days=30),
    # Per-consumer overrides of RETENTION: {"orders.tasks.place_order": timedelta(days=90)}.
    "CONSUMER_RETENTION": {},
    # Where the key lives in an event unless a decorator says otherwise (a dotted path).
    "KEY": "eventId",
    # What a duplicate with a different payload does: "raise" (PayloadMismatch) or "discard".
    "ON_MISMATCH": "raise",
    # Keep the handler's JSON-serialisable return value so a duplicate returns it again.
    "STORE_RESULTS": True,
    # Keep each event's payload (and a mismatching one) for the admin's diff. Off: payloads
    # often hold personal data, and the fingerprint alone detects a mismatch.
    "STORE_PAYLOADS": False,
    # Count discarded duplicates on the record. Off: it makes every duplicate a write (and a
    # WAL flush at commit), several times the cost of a read-only discard.
    "RECORD_DUPLICATES": False,
    # HTTP Idempotency-Key: how long an unfinished request's key answers 409 when no live
    # transaction holds it (its process died). On PostgreSQL a live request holds a row lock
    # instead, however long it runs. Completed keys are kept for RETENTION, like events.
    "HTTP_LEASE": timedelta(minutes=1),
    # Ids a purge sweeps per transaction (one primary-key range, so at most this many records
    # deleted). Small enough that a claim of an event whose record is being purged waits for
    # one batch at most (~15 ms on PostgreSQL); large enough that per-batch costs do not
    # dominate. See docs/lifecycle.md for the measurements.
    "PURGE_BATCH_SIZE": 20_000,
    # The longest time after which a producer may publish an event again (an outbox relay's
    # retry window, a replay), which nothing in Celery's configuration reveals. Check W001
    # warns when a retention is shorter. None: not known.
    "REDELIVERY_HORIZON": None,
    # Export the counters of idempotency.metrics to Prometheus (needs prometheus-client).
    "PROMETHEUS_METRICS": False,
    # Deliveries of one message after which it is dead-lettered (reason "delivery_limit")
    # instead of being run again: a message that kills its worker (a hard time limit, an
    # out-of-memory kill) would otherwise be redelivered forever. None: no limit.
    "DELIVERY_LIMIT": 10,
    # How long a task waits out a transient database error (unreachable, serialization
    # failure, connection reset) in-process, with capped backoff, before it gives its message
    # back to the broker. Such an error never consumes the task's retries.
    "TRANSIENT_RETRY_WINDOW": timedelta(seconds=30),
    # The deepest nesting and the largest canonical JSON size of an event that is fingerprinted
    # or stored; a larger event is refused with InvalidEvent (and dead-lettered by a task).
    "MAX_EVENT_DEPTH": 64,
    "MAX_EVENT_BYTES": 1024 * 1024,
    # The immediate publish after an outbox commit: at most this long to connect and publish,
    # once per request or transaction; the relay publishes whatever it misses.
    "PUBLISH_TIMEOUT": timedelta(seconds=1),
    # After a failed immediate publish, how long later commits skip it (a circuit breaker) and
    # leave their messages to the relay.
    "PUBLISH_BREAKER_COOLDOWN": timedelta(seconds=15),
    # The outbox reconciler: how long after its publish a message whose event shows no outcome
    # (no inbox record, no dead letter) is published again, each later check waiting twice as
    # long. Longer than a message may legitimately wait: the broker's visibility timeout, a
    # backlog, the task's retries (a message queued behind a backlog is republished too, a
    # duplicate the inbox discards). None: no reconciling.
    "RECONCILE_AFTER": timedelta(hours=1),
    # Republishes of one message before the reconciler gives up and marks it failed (with the
    # reason, re-drivable like any failed outbox message). 0: mark it failed at the first check.
    "RECONCILE_REPUBLISHES": 3,
}

MISMATCH_POLICIES = ("raise", "discard")


class AppSettings:
    def __init__(self) -> None:
        self._cache: dict[str, Any] | None = None

    def _load(self) -> dict[str, Any]:
        if self._cache is None:
            user = getattr(settings, "IDEMPOTENCY", {}) or {}
            if not isinstance(user, dict):
                raise IdempotencyConfigurationError("settings.IDEMPOTENCY must be a dict")
            unknown = sorted(set(user) - set(DEFAULTS))
            if unknown:
                raise IdempotencyConfigurationError(
                    f"unknown key(s) in settings.IDEMPOTENCY: {', '.join(unknown)}; "
                    f"accepted keys are {', '.join(sorted(DEFAULTS))}"
                )
            self._cache = {**DEFAULTS, **user}
        return self._cache

    def __getattr__(self, name: str) -> Any:
        if name not in DEFAULTS:
            raise AttributeError(name)
        return self._load()[name]

    def retention_for(self, consumer: str) -> timedelta | None:
        overrides: dict[str, timedelta | None] = self.CONSUMER_RETENTION
        if consumer in overrides:
            return overrides[consumer]
        retention: timedelta | None = self.RETENTION
        return retention

    def reload(self) -> None:
        self._cache = None


app_settings = AppSettings()


@receiver(setting_changed)
def _reload(*, setting: str, **kwargs: Any) -> None:
    if setting == "IDEMPOTENCY":
        app_settings.reload()
