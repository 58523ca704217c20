"""Celery integration: the task decorator (a thin layer over :func:`run_once`), the task base
class that dead-letters what fails for good, and a worker consumer that dead-letters messages no
task could ever read.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from celery import shared_task
from celery.contrib.django.task import DjangoTask
from celery.exceptions import Reject
from celery.worker.consumer import Consumer
from django.db import InterfaceError, OperationalError

from idempotency import deadletters

from .conf import app_settings
from .decorators import run_once
from .exceptions import InvalidEventId
from .keys import KeySpec, extract_key

logger = logging.getLogger("idempotency")

#: Database errors that say nothing about the event: the attempt is retried with backoff.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (OperationalError, InterfaceError)


class IdempotentTask(DjangoTask):
    """Base of ``@idempotent_task`` tasks: a final failure becomes a dead letter.

    Final means after the task's retries, or an error it does not retry. The message is then
    rejected without requeueing (RabbitMQ routes it to the queue's dead-letter queue), and the
    database keeps it whatever the broker, for ``manage.py dead_letters`` to list and re-drive.
    """

    idempotent = True
    key_spec: KeySpec | None = None

    def on_failure(
        self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any
    ) -> None:
        deadletters.record(
            reason=deadletters.FAILED,
            task_name=self.name,
            task_id=task_id,
            args=args,
            kwargs=kwargs,
            event_id=self._event_id(args),
            exception=exc,
            traceback=str(einfo) if einfo else "",
            attempts=self.request.retries + 1,
        )

    def _event_id(self, args: Any) -> str:
        if not args:
            return ""
        try:
            spec = self.key_spec if self.key_spec is not None else app_settings.KEY
            return extract_key(args[0], spec)
        except InvalidEventId:
            return ""


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
    using: str | None = None,
    **task_options: Any,
) -> Any:
    """Declare a Celery task whose first argument is an event, applied once per consumer.

    ``@idempotent_task`` or ``@idempotent_task(key=..., consumer=..., **celery_options)``.
    The consumer name defaults to the task's name. The task is ``acks_late`` with
    ``reject_on_worker_lost``, so a killed worker's message is redelivered, not lost; transient
    database errors are retried with backoff (``autoretry_for`` adds to them); an event without
    a usable key, or one that fails for good, becomes a dead letter instead of looping.
    """
    options = {**SAFE_TASK_OPTIONS, **task_options}
    options["autoretry_for"] = (*TRANSIENT_ERRORS, *task_options.get("autoretry_for", ()))
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
                deadletters.record(
                    reason=deadletters.INVALID_KEY,
                    task_name=self.name,
                    task_id=self.request.id or "",
                    args=[event, *args],
                    kwargs=kwargs,
                    exception=exc,
                )
                raise Reject(exc, requeue=False) from exc

        run.__name__ = fn.__name__
        run.__qualname__ = fn.__qualname__
        run.__module__ = fn.__module__
        run.__doc__ = fn.__doc__
        return shared_task(bind=True, key_spec=key, **options)(run)

    return decorate(func) if func is not None else decorate


class DeadLetterConsumer(Consumer):
    """A worker consumer that keeps what Celery would otherwise log and drop.

    Enable it with ``CELERY_WORKER_CONSUMER = "idempotency.celery:DeadLetterConsumer"``.
    """

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        deadletters.record(
            reason=deadletters.UNDECODABLE,
            body=_raw_body(message),
            exception=exc,
            headers=dict(message.headers or {}),
        )
        super().on_decode_error(message, exc)

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        headers = dict(message.headers or {})
        deadletters.record(
            reason=deadletters.UNKNOWN_TASK,
            task_name=str(headers.get("task", "")),
            task_id=str(headers.get("id", "")),
            body=_raw_body(message),
            exception=exc,
            headers=headers,
        )
        super().on_unknown_task(body, message, exc)


def _raw_body(message: Any) -> str:
    body = message.body
    if isinstance(body, bytes):
        return body.decode("utf-8", errors="replace")
    return str(body)
