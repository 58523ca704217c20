"""Amazon SQS as the example's broker: kombu's transport with at-least-once fixes, its options,
and the work queue's dead-letter queue.

kombu's SQS transport has two gaps for a consumer that keeps the library's rule (a message
leaves the broker only once its outcome is durable):

- a reject without requeue only forgets the message locally. SQS still has it, and hands it out
  again once its visibility timeout expires: a task that failed for good and was stored as a dead
  letter would run again (and be dead-lettered again) until ``maxReceiveCount``. Here such a
  reject deletes the message, as RabbitMQ drops or dead-letters it.
- a redelivery is not flagged: Celery's ``delivery_info["redelivered"]`` stays false, so the
  app's ``DELIVERY_LIMIT`` never counts a message that killed its worker. Here a message whose
  ``ApproximateReceiveCount`` is above 1 is flagged as redelivered.

A reject *with* requeue (a killed pool process, a database outage waited out) makes the message
visible again at once; SQS counts that receive too, so ``maxReceiveCount`` must leave room for
give-backs during an outage (docs/celery.md).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from kombu.transport import SQS

#: The work queue moves a message to its dead-letter queue after this many receives.
DEFAULT_MAX_RECEIVE_COUNT = 20
#: SQS long polling: a receive waits up to this long for a message (20 s is the maximum).
DEFAULT_WAIT_TIME_SECONDS = 20


class Channel(SQS.Channel):
    def basic_reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        if requeue:
            super().basic_reject(delivery_tag, requeue=True)
            return
        # The worker rejects without requeue once the outcome is durable (a dead letter is
        # stored): the message must leave SQS, or it comes back after the visibility timeout.
        self.basic_ack(delivery_tag)

    def _message_to_python(self, message: Any, queue_name: Any, q_url: Any) -> Any:
        payload = super()._message_to_python(message, queue_name, q_url)  # type: ignore[misc]
        attributes = message.get("Attributes") or {}
        try:
            receives = int(attributes.get("ApproximateReceiveCount", "1"))
        except (TypeError, ValueError):
            receives = 1
        if receives > 1 and isinstance(payload, dict):
            properties = payload.setdefault("properties", {})
            properties.setdefault("delivery_info", {})["redelivered"] = True
        return payload


class Transport(SQS.Transport):
    Channel = Channel


def transport_options(env: Mapping[str, str], *, visibility_timeout: int) -> dict[str, Any]:
    """``broker_transport_options`` for SQS, from the environment (docs/deployment.md)."""
    options: dict[str, Any] = {
        "region": env.get("CELERY_SQS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
        # Only used when kombu creates the queue; declare_queues() sets it on an existing one.
        "visibility_timeout": int(env.get("CELERY_VISIBILITY_TIMEOUT", visibility_timeout)),
        "wait_time_seconds": int(
            env.get("CELERY_SQS_WAIT_TIME_SECONDS", DEFAULT_WAIT_TIME_SECONDS)
        ),
        "queue_name_prefix": env.get("CELERY_SQS_QUEUE_PREFIX", ""),
        # An endpoint named in the URL (a local emulator) may be plain HTTP.
        "is_secure": env.get("CELERY_SQS_SECURE", "1").lower() in {"1", "true", "yes", "on"},
        # The receive count, read to flag redeliveries (Channel._message_to_python).
        "fetch_message_attributes": ["ApproximateReceiveCount"],
        "client-config": {"connect_timeout": 5, "read_timeout": 30},
    }
    return options


def queue_names(queue: str, prefix: str = "") -> tuple[str, str]:
    """The SQS names of the work queue and of its dead-letter queue.

    kombu maps ``.`` to ``-`` in SQS names: ``<queue>.dead`` (project.queues) is
    ``<queue>-dead``, so the same name serves every broker.
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
    """:func:`declare_queues` with the boto3 client and options of a kombu SQS connection."""
    options = connection.transport_options or {}
    return declare_queues(
        connection.default_channel.sqs(),
        queue,
        visibility_timeout=int(options.get("visibility_timeout") or 1800),
        max_receive_count=max_receive_count,
        prefix=options.get("queue_name_prefix", ""),
    )
