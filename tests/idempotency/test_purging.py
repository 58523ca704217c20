"""The records that share the inbox's retention (idempotency/purging.py): HTTP idempotency keys,
sent outbox messages and delivery counters, purged by the inbox's command and beat task."""

from __future__ import annotations

import io
from datetime import timedelta
from unittest import mock

import pytest
from django.core.management import call_command
from django.test import override_settings
from django.utils import timezone

from idempotency.models import ProcessedEvent
from idempotency.tasks import purge_processed_events
from tests.factories import ProcessedEventFactory

pytestmark = pytest.mark.django_db


def test_the_purge_also_expires_http_keys_and_sent_outbox_messages() -> None:
    from datetime import timedelta
    from io import StringIO

    from django.core.management import call_command
    from django.utils import timezone

    from idempotency.models import IdempotencyKey, OutboxMessage

    old = timezone.now() - timedelta(days=31)
    key = {"owner": "user:1", "endpoint": "POST x", "locked_until": old}
    IdempotencyKey.objects.create(**key, key="k-old", created_at=old)
    IdempotencyKey.objects.create(**key, key="k-new")
    OutboxMessage.objects.create(task_name="t", published_at=old, created_at=old)
    OutboxMessage.objects.create(task_name="t", published_at=timezone.now())
    owed = OutboxMessage.objects.create(task_name="t", created_at=old)  # never published
    out = StringIO()
    call_command("purge_processed_events", stdout=out)
    assert "Deleted 1 HTTP idempotency keys." in out.getvalue()
    assert "Deleted 1 published outbox messages." in out.getvalue()
    assert list(IdempotencyKey.objects.values_list("key", flat=True)) == ["k-new"]
    assert OutboxMessage.objects.count() == 2
    assert OutboxMessage.objects.filter(pk=owed.pk).exists()


@override_settings(IDEMPOTENCY={"RETENTION": None})
def test_an_explicit_cut_off_never_purges_what_retention_none_keeps() -> None:
    from idempotency.models import DeliveryAttempt, IdempotencyKey, OutboxMessage

    old = timezone.now() - timedelta(days=400)
    IdempotencyKey.objects.create(
        owner="user:1", endpoint="POST x", key="k-old", locked_until=old, created_at=old
    )
    OutboxMessage.objects.create(task_name="t", published_at=old, created_at=old)
    DeliveryAttempt.objects.create(task_id="t-1", last_delivered_at=old)
    ProcessedEventFactory(consumer="tests.consumer", processed_at=old)
    out = io.StringIO()
    call_command("purge_processed_events", "--older-than", "1d", stdout=out)
    assert "HTTP idempotency keys" not in out.getvalue()
    assert IdempotencyKey.objects.count() == 1
    assert OutboxMessage.objects.count() == 1
    assert DeliveryAttempt.objects.count() == 1
    assert ProcessedEvent.objects.count() == 1


def test_cut_offs_come_from_the_database_clock() -> None:
    from idempotency.models import IdempotencyKey

    IdempotencyKey.objects.create(
        owner="user:1", endpoint="POST x", key="k-fresh", locked_until=timezone.now()
    )
    fresh = ProcessedEventFactory(consumer="tests.consumer")  # stamped now() by the database
    fresh.refresh_from_db()
    ahead = timezone.now() + timedelta(days=100)  # this process's clock is far ahead
    with mock.patch("django.utils.timezone.now", return_value=ahead):
        call_command("purge_processed_events", stdout=io.StringIO())
        purge_processed_events.apply()
    assert ProcessedEvent.objects.filter(pk=fresh.pk).exists()
    assert IdempotencyKey.objects.filter(key="k-fresh").exists()


def test_delivery_counters_are_purged_with_the_inbox_retention() -> None:
    from idempotency.models import DeliveryAttempt

    old = timezone.now() - timedelta(days=31)
    DeliveryAttempt.objects.create(task_id="t-old", last_delivered_at=old)
    DeliveryAttempt.objects.create(task_id="t-new")
    out = io.StringIO()
    call_command("purge_processed_events", stdout=out)
    assert "Deleted 1 delivery counters." in out.getvalue()
    assert list(DeliveryAttempt.objects.values_list("task_id", flat=True)) == ["t-new"]
    DeliveryAttempt.objects.create(task_id="t-old-2", last_delivered_at=old)
    purge_processed_events.apply()
    assert list(DeliveryAttempt.objects.values_list("task_id", flat=True)) == ["t-new"]
