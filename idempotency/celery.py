"""The Celery task decorator: a thin layer over :func:`idempotency.decorators.run_once`."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from celery import shared_task
from celery.contrib.django.task import DjangoTask
from celery.exceptions import Reject

from .decorators import run_once
from .exceptions import InvalidEventId
from .keys import KeySpec

logger = logging.getLogger("idempotency")

#: Task options that make at-least-once delivery safe; a decorator argument overrides them.
SAFE_TASK_OPTIONS: dict[str, Any] = {
    "acks_late": True,
    "reject_on_worker_lost": True,
    "base": DjangoTask,
}


def idempotent_task(
    func: Callable[..., Any] | None = None,
    *,
    key: KeySpec | None = None,
    consumer: str | None = None,
    on_mismatch: str | None = None,
    store_result: bool | None = None,
    using: str | None = None,
    **task_options: Any,
) -> Any:
    """Declare a Celery task whose first argument is an event, applied once per consumer.

    ``@idempotent_task`` or ``@idempotent_task(key=..., consumer=..., **celery_options)``.
    The consumer name defaults to the task's name. The task is ``acks_late`` with
    ``reject_on_worker_lost``, so a killed worker's message is redelivered, not lost. An event
    without a usable key is rejected without requeueing: it could never succeed.
    """
    options = {**SAFE_TASK_OPTIONS, **task_options}
    bind = options.pop("bind", False)

    def decorate(fn: Callable[..., Any]) -> Any:
        def run(self: Any, event: Any, *args: Any, **kwargs: Any) -> Any:
            call_args = (self, event, *args) if bind else (event, *args)
            try:
                return run_once(
                    consumer or self.name,
                    event,
                    lambda: fn(*call_args, **kwargs),
                    key=key,
                    on_mismatch=on_mismatch,
                    store_result=store_result,
                    using=using,
                )
            except InvalidEventId as exc:
                logger.error(
                    "%s rejected a message without a usable key: %s",
                    self.name,
                    exc,
                    extra={"consumer": consumer or self.name},
                )
                raise Reject(exc, requeue=False) from exc

        run.__name__ = fn.__name__
        run.__qualname__ = fn.__qualname__
        run.__module__ = fn.__module__
        run.__doc__ = fn.__doc__
        # ``idempotent`` becomes an attribute of the task class; the system checks look for it.
        return shared_task(bind=True, idempotent=True, **options)(run)

    return decorate(func) if func is not None else decorate
