"""The outbox: stored with the producer's transaction, published after it, never lost."""

from __future__ import annotations

from typing import Any
from unittest import mock

import pytest
from django.core.management import CommandError, call_command
from django.db import transaction
from kombu.exceptions import OperationalError as BrokerDown

from idempotency import outbox
from idempotency.models import OutboxMessage

pytestmark = pytest.mark.django_db


@pytest.fixture
def broker() -> Any:
    with mock.patch("idempotency.outbox.current_app") as app:
        app.connection_for_write.return_value.connection_errors = ()
        app.connection_for_write.return_value.channel_errors = ()
        yield app.send_task


def test_a_rolled_back_transaction_leaves_nothing_to_publish(broker: mock.Mock) -> None:
    class Abort(Exception):
        pass

    with pytest.raises(Abort), transaction.atomic():
        outbox.enqueue("orders.tasks.place_order", [{"eventId": "e-1"}], event_id="e-1")
        raise Abort
    assert not OutboxMessage.objects.exists()
    assert outbox.relay() == 0
    assert not broker.called


def test_commit_publishes_and_marks(
    broker: mock.Mock, django_capture_on_commit_callbacks: Any
) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        message = outbox.enqueue("t.name", [{"eventId": "e-1"}], {"x": 1}, event_id="e-1")
    broker.assert_called_once()
    assert broker.call_args.args == ("t.name",)
    assert broker.call_args.kwargs["args"] == [{"eventId": "e-1"}]
    assert broker.call_args.kwargs["kwargs"] == {"x": 1}
    assert broker.call_args.kwargs["task_id"] == str(message.task_id)
    message.refresh_from_db()
    assert message.published_at is not None
    assert not OutboxMessage.objects.pending().exists()


def test_a_broker_outage_keeps_the_messages_for_the_relay(
    broker: mock.Mock, django_capture_on_commit_callbacks: Any
) -> None:
    broker.side_effect = BrokerDown("connection refused")
    with django_capture_on_commit_callbacks(execute=True):
        for n in range(3):
            outbox.enqueue("t.name", [{"eventId": f"e-{n}"}], event_id=f"e-{n}")
    # The commit went through; the publish after it failed quietly.
    assert OutboxMessage.objects.pending().count() == 3
    first = OutboxMessage.objects.order_by("pk").first()
    assert first is not None
    assert first.attempts == 1
    assert "connection refused" in first.last_error
    with pytest.raises(BrokerDown):
        outbox.relay()
    broker.side_effect = None
    broker.reset_mock()
    assert outbox.relay(batch_size=2) == 3
    assert [c.kwargs["args"][0]["eventId"] for c in broker.call_args_list] == ["e-0", "e-1", "e-2"]
    assert not OutboxMessage.objects.pending().exists()


def test_a_failure_mid_batch_keeps_what_was_sent(broker: mock.Mock) -> None:
    for n in range(3):
        outbox.enqueue("t.name", [n], publish_on_commit=False)
    broker.side_effect = [None, BrokerDown("gone"), None]
    assert outbox.relay(quiet=True) == 1
    assert OutboxMessage.objects.pending().count() == 2


def test_the_relay_command(broker: mock.Mock, capsys: pytest.CaptureFixture[str]) -> None:
    from io import StringIO

    outbox.enqueue("t.name", [1], publish_on_commit=False)
    out = StringIO()
    call_command("relay_outbox", stdout=out)
    assert "published 1 message(s)" in out.getvalue()
    assert "0 pending" in out.getvalue()
    broker.side_effect = BrokerDown("down")
    outbox.enqueue("t.name", [2], publish_on_commit=False)
    with pytest.raises(CommandError, match="down"):
        call_command("relay_outbox", stdout=StringIO())
    with pytest.raises(CommandError, match="batch-size"):
        call_command("relay_outbox", "--batch-size", "0", stdout=StringIO())


def test_the_beat_task_relays(broker: mock.Mock) -> None:
    from idempotency.tasks import relay_outbox

    outbox.enqueue("t.name", [1], publish_on_commit=False)
    assert relay_outbox.apply().get() == 1
    broker.side_effect = BrokerDown("down")
    outbox.enqueue("t.name", [2], publish_on_commit=False)
    assert relay_outbox.apply().get() == 0  # quiet: the next run retries
    assert OutboxMessage.objects.pending().count() == 1
