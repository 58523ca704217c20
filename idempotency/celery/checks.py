"""Celery's part of the system checks: W003, and the redelivery horizons that a broker's
visibility timeout and a task's retries set, which the inbox's W001 and the outbox
reconciler's W006 weigh.

Registered by :mod:`idempotency.checks`, which finds the project's Celery app.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.core.checks import CheckMessage, Warning

from ..inbox.checks import Horizon, human_duration

#: Kombu's visibility timeouts when the broker options set none (seconds).
DEFAULT_VISIBILITY_TIMEOUTS = {"redis": 3600, "rediss": 3600, "sentinel": 3600, "sqs": 1800}

#: Stands for "retries without a limit": longer than any retention.
UNBOUNDED = timedelta.max


def tasks_acking_late(app: Any) -> list[CheckMessage]:
    """W003: an idempotent task that acks early loses the event if its worker dies mid-task."""
    messages: list[CheckMessage] = []
    for name, task in sorted(app.tasks.items()):
        if getattr(task, "idempotent", False) is True and not task.acks_late:
            messages.append(
                Warning(
                    f"the idempotent task {name!r} is not acks_late: a worker killed mid-task "
                    "acknowledges the message and the event is lost.",
                    hint="Keep the acks_late=True default of @idempotent_task.",
                    obj=name,
                    id="idempotency.W003",
                )
            )
    return messages


def broker_horizon(app: Any) -> Horizon | None:
    """Redis and SQS hand an unacknowledged message out again after the visibility timeout."""
    options = app.conf.broker_transport_options or {}
    if "visibility_timeout" in options:
        seconds = options["visibility_timeout"]
        where = "broker_transport_options['visibility_timeout']"
    else:
        scheme = str(app.conf.broker_url or "").partition("://")[0].partition("+")[0]
        if scheme not in DEFAULT_VISIBILITY_TIMEOUTS:
            return None  # RabbitMQ redelivers at once, when the consumer's channel closes
        seconds = DEFAULT_VISIBILITY_TIMEOUTS[scheme]
        where = f"the {scheme} transport's default visibility_timeout"
    return Horizon(timedelta(seconds=float(seconds)), f"{where} ({human_duration(seconds)})")


def retry_horizon(app: Any, task: Any) -> Horizon:
    """The longest a task's retries may be spread over: a retried copy of an event comes back
    after another copy was processed.

    It reads the task's attributes and Celery's ``task_annotations`` for it: ``max_retries``
    (``retry_kwargs['max_retries']``), ``default_retry_delay`` (``retry_kwargs['countdown']``)
    for retries the task asks for itself, and for ``autoretry_for`` retries with
    ``retry_backoff``, the sum of the exponential delays capped at ``retry_backoff_max``.
    """
    from celery.app.annotations import resolve_all

    names = (
        "max_retries",
        "default_retry_delay",
        "retry_kwargs",
        "retry_backoff",
        "retry_backoff_max",
        "autoretry_for",
    )
    attrs = {name: getattr(task, name, None) for name in names}
    annotations: Any = resolve_all(app.annotations, task)
    for annotation in annotations:
        attrs.update({k: v for k, v in annotation.items() if k in names})
    retry_kwargs = attrs["retry_kwargs"] or {}
    max_retries = retry_kwargs.get("max_retries", attrs["max_retries"])
    if max_retries is None:
        return Horizon(UNBOUNDED, f"task {task.name!r} retries without limit", task.name)
    delay = float(retry_kwargs.get("countdown", attrs["default_retry_delay"]) or 0)
    total = max_retries * delay
    source = f"max_retries={max_retries} x default_retry_delay={human_duration(delay)}"
    # @idempotent_task keeps its autoretry_for as retry_for (it retries them itself).
    if (attrs["autoretry_for"] or getattr(task, "retry_for", None)) and attrs["retry_backoff"]:
        factor = int(max(1.0, float(attrs["retry_backoff"])))
        cap = attrs["retry_backoff_max"] if attrs["retry_backoff_max"] is not None else 600
        backoff = 0
        for n in range(max_retries):
            if factor * 2**n >= cap:  # every later retry waits the cap
                backoff += cap * (max_retries - n)
                break
            backoff += factor * 2**n
        if backoff > total:
            total = backoff
            cap_written = human_duration(cap)
            source = f"{max_retries} retries backing off up to retry_backoff_max={cap_written}"
    try:
        spread = timedelta(seconds=total)
    except OverflowError:
        spread = UNBOUNDED
    return Horizon(spread, f"task {task.name!r}: {source}", task.name)


def celery_horizons(app: Any) -> list[Horizon]:
    """The broker's horizon (if it has one), then each idempotent task's retry span."""
    horizons: list[Horizon] = []
    broker = broker_horizon(app)
    if broker is not None:
        horizons.append(broker)
    for _name, task in sorted(app.tasks.items()):
        if getattr(task, "idempotent", False) is True:
            horizons.append(retry_horizon(app, task))
    return horizons
