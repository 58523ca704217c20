"""Prometheus counters fed by the app's signals. Optional: needs ``prometheus-client`` and
``IDEMPOTENCY["PROMETHEUS_METRICS"] = True``; ``AppConfig.ready()`` then connects them.

=============================================  =========  ====================================
metric                                         labels     counts
=============================================  =========  ====================================
``idempotency_events_processed_total``         consumer   first deliveries applied (any outcome)
``idempotency_events_rejected_total``          consumer   of those, the ones rejected
``idempotency_duplicates_discarded_total``     consumer   duplicate deliveries skipped
``idempotency_payload_mismatches_total``       consumer   duplicates whose payload differed
``idempotency_records_purged_total``           (none)     records deleted by purges
``idempotency_outbox_republished_total``       consumer   outbox messages sent again: no outcome
``idempotency_outbox_unresolved_total``        consumer   outbox messages the reconciler failed
=============================================  =========  ====================================

A claim's counters move when its transaction commits, so a rolled-back attempt (retried later)
is not counted twice. They live in prometheus-client's default registry; expose it the way the
project exposes its other metrics (and, for Celery's prefork workers, in multiprocess mode).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

from django.db import DEFAULT_DB_ALIAS, transaction

from . import signals
from .conf import app_settings
from .exceptions import IdempotencyConfigurationError

#: (signal, metric name without ``_total``, description, labelled by consumer)
METRICS = (
    (signals.event_processed, "idempotency_events_processed", "First deliveries applied", True),
    (signals.event_rejected, "idempotency_events_rejected", "Events rejected (final)", True),
    (signals.duplicate_discarded, "idempotency_duplicates_discarded", "Duplicates skipped", True),
    (signals.payload_mismatch, "idempotency_payload_mismatches", "Reused ids, new payload", True),
    (signals.events_purged, "idempotency_records_purged", "Records deleted by purges", False),
    (
        signals.outbox_republished,
        "idempotency_outbox_republished",
        "Outbox messages published again: no outcome of their event seen",
        True,
    ),
    (
        signals.outbox_unresolved,
        "idempotency_outbox_unresolved",
        "Outbox messages marked failed: no outcome after every republish",
        True,
    ),
)

_counters: dict[str, Any] = {}
_receivers: list[tuple[Any, Callable[..., None]]] = []


def prometheus_available() -> bool:
    return importlib.util.find_spec("prometheus_client") is not None


def counters() -> dict[str, Any]:
    """The counters by name, created once per process in the default registry."""
    if not _counters:
        from prometheus_client import Counter

        for _signal, name, description, by_consumer in METRICS:
            labels = ["consumer"] if by_consumer else []
            _counters[name] = Counter(name, description, labels)
    return _counters


def _receiver(name: str, by_consumer: bool) -> Callable[..., None]:
    counter = counters()[name]

    def receive(*, consumer: str = "", record: Any = None, count: int = 1, **kwargs: Any) -> None:
        metric = counter.labels(consumer=consumer) if by_consumer else counter
        using = kwargs.get("using") or getattr(getattr(record, "_state", None), "db", None)
        # Counted when the claim's transaction commits (at once outside a transaction).
        transaction.on_commit(lambda: metric.inc(count), using=using or DEFAULT_DB_ALIAS)

    return receive


def connect() -> None:
    """Feed the counters from the signals (idempotent)."""
    if _receivers:
        return
    for signal, name, _description, by_consumer in METRICS:
        receiver = _receiver(name, by_consumer)
        signal.connect(receiver, dispatch_uid=f"idempotency.metrics.{name}")
        _receivers.append((signal, receiver))


def disconnect() -> None:
    for signal, name, *_ in METRICS:
        signal.disconnect(dispatch_uid=f"idempotency.metrics.{name}")
    _receivers.clear()


def connect_if_enabled() -> bool:
    """Connect when the setting is on and prometheus-client importable; whether it did."""
    try:
        enabled = app_settings.PROMETHEUS_METRICS
    except IdempotencyConfigurationError:
        return False  # the system checks report the settings (E001)
    if not enabled or not prometheus_available():
        return False
    connect()
    return True
