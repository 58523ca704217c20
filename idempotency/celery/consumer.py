"""A worker consumer that dead-letters the messages no task could ever read."""

from __future__ import annotations

import time
from typing import Any

from celery.worker.consumer import Consumer

from .. import deadletters


class DeadLetterConsumer(Consumer):
    """A worker consumer that keeps what Celery would otherwise log and drop.

    Enable it with ``CELERY_WORKER_CONSUMER = "idempotency.celery:DeadLetterConsumer"``. A
    message whose dead letter could not be stored (the database is down) is not dropped: on
    RabbitMQ it is rejected into the queue's dead-letter queue (``manage.py dead_letters
    import`` brings it in later), elsewhere it goes back to its queue after a pause.
    """

    #: How long the consumer pauses before giving back a message it could not dead-letter, so
    #: a database outage does not spin it on the same message.
    give_back_pause = 1.0

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        headers = dict(message.headers or {})
        letter = deadletters.record(
            reason=deadletters.UNDECODABLE,
            task_name=str(headers.get("task", "")),
            task_id=str(headers.get("id", "")),
            body=_raw_body(message),
            exception=exc,
            headers=headers,
        )
        if letter is None:
            self._keep(message)
            return
        super().on_decode_error(message, exc)

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        headers = dict(message.headers or {})
        letter = deadletters.record(
            reason=deadletters.UNKNOWN_TASK,
            task_name=str(headers.get("task", "")),
            task_id=str(headers.get("id", "")),
            body=_raw_body(message),
            exception=exc,
            headers=headers,
        )
        if letter is None:
            self._keep(message)
            return
        super().on_unknown_task(body, message, exc)

    def _keep(self, message: Any) -> None:
        transport = getattr(getattr(self, "connection", None), "transport", None)
        if getattr(transport, "driver_type", "") == "amqp":
            message.reject(requeue=False)  # RabbitMQ routes it to <queue>.dead
            return
        time.sleep(self.give_back_pause)
        message.reject(requeue=True)


def _raw_body(message: Any) -> str:
    body = message.body
    if isinstance(body, bytes):
        return body.decode("utf-8", errors="replace")
    return str(body)
