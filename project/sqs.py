"""Amazon SQS as the example's broker: the library's transport (``idempotency.celery.sqs``,
which deletes a message rejected without requeue and flags a redelivery) and its options read
from the environment (docs/deployment.md).

The names below are the library's, re-exported so the example's older path
``project.sqs:Transport`` keeps working; settings name ``idempotency.celery.sqs:Transport``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from idempotency.celery import sqs as _sqs
from idempotency.celery.sqs import (
    DEFAULT_MAX_RECEIVE_COUNT,
    DEFAULT_WAIT_TIME_SECONDS,
    Channel,
    Transport,
    declare_from_connection,
    declare_queues,
    queue_names,
)

__all__ = [
    "DEFAULT_MAX_RECEIVE_COUNT",
    "DEFAULT_WAIT_TIME_SECONDS",
    "Channel",
    "Transport",
    "declare_from_connection",
    "declare_queues",
    "queue_names",
    "transport_options",
]


def transport_options(env: Mapping[str, str], *, visibility_timeout: int) -> dict[str, Any]:
    """``broker_transport_options`` for SQS, from the environment (docs/deployment.md)."""
    return _sqs.transport_options(
        region=env.get("CELERY_SQS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
        visibility_timeout=int(env.get("CELERY_VISIBILITY_TIMEOUT", visibility_timeout)),
        wait_time_seconds=int(env.get("CELERY_SQS_WAIT_TIME_SECONDS", DEFAULT_WAIT_TIME_SECONDS)),
        queue_name_prefix=env.get("CELERY_SQS_QUEUE_PREFIX", ""),
        # An endpoint named in the URL (a local emulator) may be plain HTTP.
        is_secure=env.get("CELERY_SQS_SECURE", "1").lower() in {"1", "true", "yes", "on"},
        **{"client-config": {"connect_timeout": 5, "read_timeout": 30}},
    )
