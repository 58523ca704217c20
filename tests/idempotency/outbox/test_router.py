"""The outbox under a primary/replica router: every write, lock, transaction and on_commit on
the write alias, never on the read alias ``OutboxMessage.objects.db``."""

from __future__ import annotations

from io import StringIO
from typing import Any
from unittest import mock

import pytest
from django.core.management import call_command
from django.db import InternalError, connections, router, transaction

from idempotency import outbox
from idempotency.models import OutboxMessage
from tests.celery_app import mocked_celery_app
from tests.replica import Replica, uses_replica

pytestmark = [pytest.mark.services, uses_replica]


@pytest.fixture
def broker() -> Any:
    with mocked_celery_app() as app:
        app.connection_for_write.return_value.connection_errors = ()
        app.connection_for_write.return_value.channel_errors = ()
        yield app.send_task


def test_the_replica_is_read_only_and_the_router_splits(primary_replica: Replica) -> None:
    assert OutboxMessage.objects.db == primary_replica.replica
    assert router.db_for_write(OutboxMessage) == primary_replica.primary
    with pytest.raises(InternalError, match="read-only transaction"):
        OutboxMessage.objects.using(primary_replica.replica).create(task_name="t.name")
    message = OutboxMessage.objects.create(task_name="t.name")
    # Committed on the primary (the test is transactional), so the replica sees it.
    assert OutboxMessage.objects.using(primary_replica.replica).filter(pk=message.pk).exists()


def test_no_publish_for_a_transaction_that_rolls_back(
    primary_replica: Replica, broker: mock.Mock
) -> None:
    class Abort(Exception):
        pass

    with pytest.raises(Abort), transaction.atomic():
        outbox.enqueue("t.name", [{"eventId": "e-1"}], event_id="e-1")
        # Nothing is published while the transaction is open...
        assert not broker.called
        raise Abort
    # ...nor after it rolled back: no phantom message for a row that never existed.
    assert not broker.called
    assert not OutboxMessage.objects.exists()


def test_a_commit_publishes_once_after_it(primary_replica: Replica, broker: mock.Mock) -> None:
    with transaction.atomic():
        message = outbox.enqueue("t.name", [{"eventId": "e-1"}], event_id="e-1")
        assert not broker.called
    broker.assert_called_once()
    assert broker.call_args.kwargs["task_id"] == str(message.task_id)
    message.refresh_from_db(using=primary_replica.primary)
    assert message.published_at is not None


def test_the_relay_locks_and_marks_on_the_primary(
    primary_replica: Replica, broker: mock.Mock
) -> None:
    for n in range(3):
        outbox.enqueue("t.name", [n], publish_on_commit=False)
    out = StringIO()
    call_command("relay_outbox", stdout=out)
    assert "published 3 message(s)" in out.getvalue()
    assert "0 pending" in out.getvalue()
    assert broker.call_count == 3
    assert not OutboxMessage.objects.using(primary_replica.primary).pending().exists()
    # The replica connection was never asked to lock or write.
    assert not connections[primary_replica.replica].in_atomic_block
