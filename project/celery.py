"""The Celery app: ``celery -A project worker``. Settings come from Django's ``CELERY_*``."""

from __future__ import annotations

import os
from typing import Any

from celery import Celery, signals

from project import embedded_broker

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
# embedded:// (the default CELERY_BROKER_URL) names project/embedded_broker.py's transport in
# every process that publishes or consumes: the web server, the worker, the relay.
embedded_broker.register()

app = Celery("project")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@signals.worker_init.connect
def declare_dead_letter_queue(**kwargs: Any) -> None:
    """Make sure the queue that receives rejected messages exists (RabbitMQ, SQS)."""
    from django.conf import settings

    from project.queues import dead_letter_queue

    with app.connection_for_write() as connection:
        if connection.transport.driver_type == "sqs":
            declare_sqs_queues(connection)
            return
        if connection.transport.driver_type != "amqp":
            return
        dead_letter_queue(settings.CELERY_QUEUE).bind(connection.default_channel).declare()


def declare_sqs_queues(connection: Any) -> None:
    """SQS: the work queue's visibility timeout and redrive policy, and its dead-letter queue.

    CELERY_SQS_DECLARE=0 skips it where the queues are managed elsewhere (Terraform, say) or
    the worker may not change them (no sqs:CreateQueue / sqs:SetQueueAttributes).
    """
    from django.conf import settings

    from idempotency.celery import sqs

    if os.environ.get("CELERY_SQS_DECLARE", "1") == "0":
        return
    sqs.declare_from_connection(connection, settings.CELERY_QUEUE, settings.SQS_MAX_RECEIVE_COUNT)


@signals.task_prerun.connect
@signals.task_postrun.connect
def close_broken_connections(sender: Any = None, **kwargs: Any) -> None:
    """What Django does around each request: drop a connection that broke or grew too old.

    With CELERY_DB_REUSE_MAX the fix-up keeps connections open across tasks (a new PostgreSQL
    connection per task costs more than a small task itself); this keeps that safe.
    """
    from django.db import connections

    if getattr(getattr(sender, "request", None), "is_eager", False):
        return  # run in the caller's process and transaction: not ours to close
    for connection in connections.all(initialized_only=True):
        if not connection.in_atomic_block:
            connection.close_if_unusable_or_obsolete()
