"""Dead letters, delivery counters and purges write to the router's write alias, never to the
read alias (``Model.objects.db``), which on a hot standby refuses every write."""

from __future__ import annotations

from datetime import timedelta
from io import StringIO
from typing import Any

import pytest
from django.core.management import call_command
from django.db import connections
from django.utils import timezone

from idempotency import deadletters
from idempotency.celery import idempotent_task
from idempotency.models import DeadLetter, DeliveryAttempt, IdempotencyKey, ProcessedEvent
from idempotency.tasks import purge_processed_events
from tests.celery_app import mocked_celery_app
from tests.replica import Replica, uses_replica

pytestmark = [pytest.mark.services, uses_replica]


@idempotent_task
def failing(event: dict[str, Any]) -> None:
    raise ValueError("a bug")


def test_the_replica_refuses_writes(primary_replica: Replica) -> None:
    # What the tests below rely on: a write sent to the read alias fails.
    assert DeadLetter.objects.db == primary_replica.replica
    with pytest.raises(Exception, match="read-only transaction"):
        DeadLetter.objects.using(primary_replica.replica).create(reason="failed")


def test_dead_letters_are_stored_and_redriven_on_the_primary(primary_replica: Replica) -> None:
    letter = deadletters.record(reason="failed", task_name="t", task_id="t-1", args=[{"a": 1}])
    assert letter is not None
    result = failing.apply(args=[{"eventId": "e-1"}])
    assert isinstance(result.result, ValueError)  # stored, so the failure is final
    assert DeadLetter.objects.count() == 2  # read back through the replica: committed
    with mocked_celery_app():
        done, skipped = deadletters.redrive([letter])
    assert (len(done), skipped) == (1, [])
    assert DeadLetter.objects.get(pk=letter.pk).redriven_at is not None


def test_delivery_counters_are_written_on_the_primary(primary_replica: Replica) -> None:
    assert DeliveryAttempt.objects.count_delivery("t-1") == 2
    assert DeliveryAttempt.objects.count_delivery("t-1") == 3
    assert DeliveryAttempt.objects.get().deliveries == 3


def test_the_purges_run_on_the_primary(primary_replica: Replica) -> None:
    old = timezone.now() - timedelta(days=60)
    primary = primary_replica.primary
    ProcessedEvent.objects.using(primary).create(consumer="c", event_id="e", processed_at=old)
    IdempotencyKey.objects.using(primary).create(
        owner="u", endpoint="POST x", key="k", locked_until=old, created_at=old
    )
    DeliveryAttempt.objects.using(primary).create(task_id="t", last_delivered_at=old)
    assert purge_processed_events.apply().get() == 1
    assert not IdempotencyKey.objects.exists()
    assert not DeliveryAttempt.objects.exists()
    ProcessedEvent.objects.using(primary).create(consumer="c", event_id="e2", processed_at=old)
    call_command("purge_processed_events", "--older-than", "30d", stdout=StringIO())
    assert not ProcessedEvent.objects.exists()
    assert not connections[primary_replica.replica].in_atomic_block
