"""Amazon SQS that keeps the delivery rule (``pip install "django-idempotency[sqs]"``).

``CELERY_BROKER_TRANSPORT = "idempotency.celery.sqs:Transport"`` (or
``Connection(url, transport=...)`` for a plain kombu consumer). kombu's own SQS transport has
two gaps for a consumer that keeps the library's rule (a message leaves the broker only once its
outcome is durable):

- a reject without requeue only forgets the message locally. SQS still has it, and hands it out
  again once its visibility timeout expires: a task that failed for good and was stored as a dead
  letter would run again (and be dead-lettered again) until ``maxReceiveCount``. Here such a
  reject deletes the message, as RabbitMQ drops or dead-letters it.
- a redelivery is not flagged: Celery's ``delivery_info["redelivered"]`` stays false, so the
  app's ``DELIVERY_LIMIT`` never counts a message that killed its worker. Here a message whose
  ``ApproximateReceiveCount`` is above 1 is flagged as redelivered (every receive asks for
  that attribute, whatever the transport options say).

A reject *with* requeue (a killed pool process, a database outage waited out) makes the message
visible again at once; SQS counts that receive too, so ``maxReceiveCount`` must leave room for
give-backs during an outage (docs/celery.md).

:func:`declare_queues` creates the work queue with its visibility timeout and a redrive policy
to its dead-letter queue; :func:`declare_from_connection` does it with a kombu connection's
client and options (at worker start, say).
"""

from __future__ import annotations

import json
from queue import Empty
from typing import Any

from ..extras import require

# The sqs extra: kombu's SQS transport talks to SQS through boto3.
require("sqs", "idempotency.celery.sqs", "boto3")

from kombu.asynchronous.aws.sqs.message import AsyncMessage  # noqa: E402
from kombu.transport import SQS  # noqa: E402

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

#: The work queue moves a message to its dead-letter queue after this many receives.
DEFAULT_MAX_RECEIVE_COUNT = 20
#: SQS long polling: a receive waits up to this long for a message (20 s is the maximum).
DEFAULT_WAIT_TIME_SECONDS = 20
#: The message attribute the redelivery flag is read from.
RECEIVE_COUNT = "ApproximateReceiveCount"


class Channel(SQS.Channel):
    def basic_reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        if requeue:
            super().basic_reject(delivery_tag, requeue=True)
            return
        # The worker rejects without requeue once the outcome is durable (a dead letter is
        # stored): the message must leave SQS, or it comes back after the visibility timeout.
        self.basic_ack(delivery_tag)

    @property
    def fetch_message_attributes(self) -> list[str]:
        """The attributes each receive asks for: the transport options' own, and always the
        receive count (without it no redelivery could be flagged)."""
        fetched = list(self.transport_options.get("fetch_message_attributes") or [])
        if RECEIVE_COUNT in fetched or "All" in fetched:
            return fetched
        return [*fetched, RECEIVE_COUNT]

    # kombu's synchronous receives (a plain kombu consumer's drain_events, Queue.get) ask for no
    # attribute, and SQS then sends none: they ask for fetch_message_attributes here, as kombu's
    # asynchronous receive (the Celery worker's) does.
    def _get_bulk(
        self, queue: str, max_if_unlimited: int = SQS.SQS_MAX_MESSAGES, callback: Any = None
    ) -> None:
        channel: Any = self  # kombu's SQS channel is not typed
        max_count = channel._get_message_estimate()
        if max_count:
            resp = channel.sqs(queue=queue).receive_message(
                QueueUrl=channel._new_queue(queue),
                MaxNumberOfMessages=max_count,
                WaitTimeSeconds=channel.wait_time_seconds,
                AttributeNames=self.fetch_message_attributes,
            )
            if resp.get("Messages"):
                for m in resp["Messages"]:
                    m["Body"] = AsyncMessage(body=m["Body"]).decode()
                for msg in channel._messages_to_python(resp["Messages"], queue):
                    channel.connection._deliver(msg, queue)
                return
        raise Empty()

    def _get(self, queue: str, timeout: float | None = None) -> Any:
        channel: Any = self
        resp = channel.sqs(queue=queue).receive_message(
            QueueUrl=channel._new_queue(queue),
            MaxNumberOfMessages=1,
            WaitTimeSeconds=channel.wait_time_seconds,
            AttributeNames=self.fetch_message_attributes,
        )
        if resp.get("Messages"):
            body = AsyncMessage(body=resp["Messages"][0]["Body"]).decode()
            resp["Messages"][0]["Body"] = body
            return channel._messages_to_python(resp["Messages"], queue)[0]
        raise Empty()

    def _message_to_python(self, message: Any, queue_name: Any, q_url: Any) -> Any:
        payload = super()._message_to_python(message, queue_name, q_url)  # type: ignore[misc]
        attributes = message.get("Attributes") or {}
        try:
            receives = int(attributes.get(RECEIVE_COUNT, "1"))
        except (TypeError, ValueError):
            receives = 1
        if receives > 1 and isinstance(payload, dict):
            properties = payload.setdefault("properties", {})
            properties.setdefault("delivery_info", {})["redelivered"] = True
        return payload


class Transport(SQS.Transport):
    Channel = Channel


def transport_options(
    *,
    visibility_timeout: int,
    region: str = "us-east-1",
    wait_time_seconds: int = DEFAULT_WAIT_TIME_SECONDS,
    **options: Any,
) -> dict[str, Any]:
    """``broker_transport_options`` for :class:`Transport`: *visibility_timeout* (it must
    outlast the longest task and its retries, docs/celery.md), long polling, and the receive
    count fetched with each message so that a redelivery is flagged. Other kombu SQS options
    (``queue_name_prefix``, ``is_secure``, ``predefined_queues``...) pass through *options*."""
    found: dict[str, Any] = {
        "region": region,
        # Only used when kombu creates the queue; declare_queues() sets it on an existing one.
        "visibility_timeout": int(visibility_timeout),
        "wait_time_seconds": int(wait_time_seconds),
        **options,
    }
    fetched = list(found.get("fetch_message_attributes") or [])
    if RECEIVE_COUNT not in fetched and "All" not in fetched:
        fetched.append(RECEIVE_COUNT)
    found["fetch_message_attributes"] = fetched
    return found


def queue_names(queue: str, prefix: str = "") -> tuple[str, str]:
    """The SQS names of the work queue and of its dead-letter queue.

    kombu maps ``.`` to ``-`` in SQS names: ``<queue>.dead`` is ``<queue>-dead``, so the same
    queue name serves every broker.
    """
    table = SQS.CHARS_REPLACE_TABLE
    return (prefix + queue).translate(table), (prefix + f"{queue}.dead").translate(table)


def declare_queues(
    client: Any,
    queue: str,
    *,
    visibility_timeout: int,
    max_receive_count: int = DEFAULT_MAX_RECEIVE_COUNT,
    prefix: str = "",
) -> dict[str, str]:
    """Create (or bring up to date) the work queue and its dead-letter queue with *client*
    (a boto3 SQS client): the visibility timeout, and a redrive policy that moves a message to
    the dead-letter queue after *max_receive_count* receives. Returns both queues' URLs."""
    if max_receive_count < 1:
        raise ValueError(f"max_receive_count must be at least 1, not {max_receive_count}")
    work, dead = queue_names(queue, prefix)
    dead_url = client.create_queue(QueueName=dead)["QueueUrl"]
    arn = client.get_queue_attributes(QueueUrl=dead_url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    attributes = {
        "VisibilityTimeout": str(visibility_timeout),
        "RedrivePolicy": json.dumps(
            {"deadLetterTargetArn": arn, "maxReceiveCount": str(max_receive_count)}
        ),
    }
    work_url = client.create_queue(QueueName=work)["QueueUrl"]
    # create_queue leaves an existing queue's attributes as they were: set them.
    client.set_queue_attributes(QueueUrl=work_url, Attributes=attributes)
    return {"queue": work_url, "dead": dead_url}


def declare_from_connection(
    connection: Any, queue: str, max_receive_count: int = DEFAULT_MAX_RECEIVE_COUNT
) -> dict[str, str]:
    """:func:`declare_queues` with the boto3 client and options of a kombu SQS connection
    (``app.connection_for_write()`` in a ``worker_init`` handler, say)."""
    options = connection.transport_options or {}
    return declare_queues(
        connection.default_channel.sqs(),
        queue,
        visibility_timeout=int(options.get("visibility_timeout") or 1800),
        max_receive_count=max_receive_count,
        prefix=options.get("queue_name_prefix", ""),
    )
