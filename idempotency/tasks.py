"""Celery tasks of the app. ``@shared_task``: they bind to whichever Celery app the project runs.

Schedule the purge with Celery beat, e.g. daily::

    CELERY_BEAT_SCHEDULE = {
        "idempotency-purge": {
            "task": "idempotency.tasks.purge_processed_events",
            "schedule": crontab(hour=3, minute=17),
        },
    }
"""

from __future__ import annotations

# The celery extra: without it, say which to install rather than fail on a bare import.
try:
    import celery  # noqa: F401
except ImportError as _exc:
    from .extras import missing

    raise missing("celery", "idempotency.tasks") from _exc

import logging
import time

from celery import shared_task
from django.db import DEFAULT_DB_ALIAS, router

from .clock import database_now
from .conf import app_settings
from .models import ProcessedEvent
from .purging import purge_other_records

logger = logging.getLogger("idempotency")


@shared_task(name="idempotency.tasks.purge_processed_events", ignore_result=True)
def purge_processed_events(batch_size: int | None = None, consumer: str | None = None) -> int:
    """Delete the records past their consumer's retention; the number deleted.

    The same batched purge as ``manage.py purge_processed_events``. Running two at once is
    harmless (they wait on each other's rows for a batch at most), and so is a lost run: the
    next one deletes what this one left.
    """
    started = time.monotonic()
    # The primary, never the read alias (a replica refuses the DELETEs), and its clock: the
    # records were stamped by it, and a worker's clock may be ahead.
    using = router.db_for_write(ProcessedEvent) or DEFAULT_DB_ALIAS
    now = database_now(using)
    records = ProcessedEvent.objects.using(using)
    deleted = records.purge(batch_size=batch_size, consumer=consumer, now=now)
    if consumer is None:
        # The HTTP keys, the sent outbox messages and the delivery counters share the inbox's
        # retention.
        purge_other_records(
            before=None,
            now=now,
            batch_size=batch_size or app_settings.PURGE_BATCH_SIZE,
            using=using,
        )
    seconds = time.monotonic() - started
    logger.info(
        "purged %d processed-event records in %.2f s",
        deleted,
        seconds,
        extra={"deleted": deleted, "seconds": seconds},
    )
    return deleted


@shared_task(name="idempotency.tasks.relay_outbox", ignore_result=True)
def relay_outbox(batch_size: int = 100) -> int:
    """Publish what the outbox holds; the number published.

    A backstop for ``manage.py relay_outbox --forever``: beat publishes this task through the
    broker, so it runs only once the broker is back, which is when it is needed.
    """
    from . import outbox

    return outbox.relay(batch_size=batch_size, quiet=True)


@shared_task(name="idempotency.tasks.reconcile_outbox", ignore_result=True)
def reconcile_outbox(batch_size: int = 100) -> int:
    """Publish again the published outbox messages whose event shows no outcome after
    ``RECONCILE_AFTER``; the number republished.

    What ``relay_outbox --forever`` does every ``--reconcile-every`` seconds, for a project
    that relays with the beat task only. Two at once share the rows (``SKIP LOCKED``).
    """
    from . import outbox

    result = outbox.reconcile(batch_size=batch_size)
    if result.checked or result.outage is not None:
        logger.info("outbox reconcile: %s", result.summary())
    if result.outage is not None:
        logger.warning(
            "outbox reconcile stopped: %s; the next run goes on", outbox.describe(result.outage)
        )
    return result.republished
