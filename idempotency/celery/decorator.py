"""``@idempotent_task``: a Celery task applied once per event and consumer."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from celery import shared_task
from django.db import connections
from django.db.transaction import TransactionManagementError

from ..decorators import run_once
from ..inbox import inbox_database
from ..keys import KeySpec
from .task import IdempotentTask


def _require_usable_transaction(using: str | None) -> None:
    """Raise if the handler caught a database error and left the claim's transaction broken.

    Django would then roll the claim back silently on leaving the block, with the effect: the
    task would succeed and the message be acknowledged with nothing applied, nothing kept.
    """
    if connections[using or inbox_database()].needs_rollback:
        raise TransactionManagementError(
            "the handler caught a database error inside the claim's transaction and went on: "
            "the transaction can only roll back, so the event is not applied. Wrap the "
            "statement that may fail in transaction.atomic() to catch its error."
        )


def _run_signature(self: Any, event: Any, *args: Any, **kwargs: Any) -> Any:
    """The signature of every ``@idempotent_task``'s ``run``: an event, then anything."""


_RUN_SIGNATURE = inspect.signature(_run_signature)

#: Task options that make at-least-once delivery safe; a decorator argument overrides them.
SAFE_TASK_OPTIONS: dict[str, Any] = {
    "acks_late": True,
    "reject_on_worker_lost": True,
    "acks_on_failure_or_timeout": False,
    "base": IdempotentTask,
    "retry_backoff": True,
    "retry_backoff_max": 60,
    "retry_jitter": True,
    "max_retries": 5,
}


def idempotent_task(
    func: Callable[..., Any] | None = None,
    *,
    key: KeySpec | None = None,
    consumer: str | None = None,
    on_mismatch: str | None = None,
    store_result: bool | None = None,
    result_serializer: Any = None,
    using: str | None = None,
    **task_options: Any,
) -> Any:
    """Declare a Celery task whose first argument is an event, applied once per consumer.

    ``@idempotent_task`` or ``@idempotent_task(key=..., consumer=..., **celery_options)``.
    The consumer name defaults to the task's name. The task is ``acks_late`` with
    ``reject_on_worker_lost``, so a killed worker's message is redelivered, not lost. Transient
    database errors are waited out, then the message goes back to the broker; ``autoretry_for``
    errors are retried with the task's retries and backoff; an event without a usable key, one
    that fails for good, or one delivered past ``DELIVERY_LIMIT`` becomes a dead letter.
    """
    options = {**SAFE_TASK_OPTIONS, **task_options}
    # Handled by deliver(), not by Celery's autoretry wrapper, which would let a final failure
    # escape to on_failure, too late to decide whether the message may leave the broker.
    options["retry_for"] = tuple(options.pop("autoretry_for", ()))
    options["dont_retry_for"] = tuple(options.pop("dont_autoretry_for", ()))
    bind = options.pop("bind", False)
    run_options: dict[str, Any] = {}
    if result_serializer is not None:
        run_options["result_serializer"] = result_serializer

    def decorate(fn: Callable[..., Any]) -> Any:
        def run(self: Any, *args: Any, **kwargs: Any) -> Any:
            # A message with no event would raise TypeError before deliver() could decide its
            # fate, and Celery would reject it without requeue even when its dead letter could
            # not be stored: it is refused as an invalid event instead (or given back).
            if args:
                event, args = args[0], args[1:]
            elif "event" in kwargs:
                event = kwargs.pop("event")
            else:
                self._refuse_without_event(kwargs)
            call_args = (self, event, *args) if bind else (event, *args)

            def handle() -> Any:
                value = fn(*call_args, **kwargs)
                _require_usable_transaction(using)
                return value

            return self.deliver(
                event,
                args,
                kwargs,
                lambda: run_once(
                    consumer or self.name,
                    event,
                    handle,
                    key=key,
                    on_mismatch=on_mismatch,
                    store_result=store_result,
                    using=using,
                    **run_options,
                ),
            )

        run.__name__ = fn.__name__
        run.__qualname__ = fn.__qualname__
        run.__module__ = fn.__module__
        run.__doc__ = fn.__doc__
        # The signature Celery checks a call against when it is sent (Task.typing): the event
        # is still required of a producer.
        run.__signature__ = _RUN_SIGNATURE  # type: ignore[attr-defined]
        # The options become attributes of the task's class: a key function stored as it is
        # would be bound as a method and called with the task first, so the reconciler, the
        # delivery limit and the dead letters would never find the key the worker claims.
        key_spec = staticmethod(key) if callable(key) else key
        return shared_task(
            bind=True, key_spec=key_spec, consumer_name=consumer, inbox_using=using, **options
        )(run)

    return decorate(func) if func is not None else decorate
