"""The outbox: stored with the producer's transaction, published after it, never lost."""

from __future__ import annotations

from typing import Any
from unittest import mock

import pytest
from celery.exceptions import QueueNotFound
from django.core.management import CommandError, call_command
from django.db import transaction
from kombu.exceptions import OperationalError as BrokerDown

from idempotency import outbox
from idempotency.models import OutboxMessage
from idempotency.outbox import publish
from tests.celery_app import mocked_celery_app

pytestmark = pytest.mark.django_db


@pytest.fixture
def app() -> Any:
    """The Celery app, mocked, with the errors py-amqp's transport declares."""
    from kombu.transport.pyamqp import Transport

    with mocked_celery_app() as app:
        app.connection_for_write.return_value.connection_errors = Transport.connection_errors
        app.connection_for_write.return_value.channel_errors = Transport.channel_errors
        yield app


@pytest.fixture
def broker(app: mock.Mock) -> Any:
    return app.send_task


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
    with pytest.raises(CommandError, match=r"broker is unavailable.*down"):
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


# --- One bad row never stops the outbox -----------------------------------------------------


def refuse(*bad: str) -> Any:
    """A send_task that refuses the messages whose first argument is in *bad* for good."""

    def send_task(name: str, args: Any = (), **options: Any) -> None:
        if args and args[0] in bad:
            raise QueueNotFound(f"Queue {args[0]!r} missing from task_queues")

    return send_task


def test_a_message_refused_for_good_is_set_aside_and_the_relay_goes_on(
    broker: mock.Mock,
) -> None:
    for name in ("good-1", "bad", "good-2"):
        outbox.enqueue("t.name", [name], publish_on_commit=False)
    broker.side_effect = refuse("bad")
    assert outbox.relay() == 2  # no exception
    assert [c.kwargs["args"][0] for c in broker.call_args_list] == ["good-1", "bad", "good-2"]
    bad = OutboxMessage.objects.get(args=["bad"])
    assert bad.failed_at is not None
    assert bad.published_at is None
    assert bad.attempts == 1
    assert "QueueNotFound" in bad.last_error
    assert "missing from task_queues" in bad.last_error
    assert set(OutboxMessage.objects.failed()) == {bad}
    assert not OutboxMessage.objects.pending().exists()
    assert OutboxMessage.objects.filter(published_at__isnull=False).count() == 2
    # Later runs leave it alone: nothing is published again, nothing raises.
    broker.reset_mock()
    assert outbox.relay() == 0
    assert not broker.called


@pytest.mark.parametrize(
    "error",
    [
        TypeError("'<' not supported between instances of 'str' and 'int'"),  # countdown="soon"
        ValueError("Expected 4 digits"),  # expires="never"
        KeyError("bogus"),  # compression="bogus"
        __import__("kombu.exceptions").exceptions.SerializerNotInstalled("bogus"),
        __import__("kombu.exceptions").exceptions.EncodeError("cannot encode"),
        __import__("amqp.exceptions").exceptions.NotFound("no exchange 'gone'"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_what_counts_as_refused_for_good(broker: mock.Mock, error: BaseException) -> None:
    outbox.enqueue("t.name", [1], publish_on_commit=False)
    outbox.enqueue("t.name", [2], publish_on_commit=False)
    broker.side_effect = [error, None]
    assert outbox.relay() == 1
    assert OutboxMessage.objects.failed().get().args == [1]


@pytest.mark.parametrize(
    "error",
    [
        BrokerDown("connection refused"),
        ConnectionRefusedError(111, "Connection refused"),
        TimeoutError("timed out"),
        __import__("amqp.exceptions").exceptions.RecoverableConnectionError("closed"),
        __import__("amqp.exceptions").exceptions.MessageNacked(),
    ],
    ids=lambda e: type(e).__name__,
)
def test_what_counts_as_an_outage(broker: mock.Mock, error: BaseException) -> None:
    outbox.enqueue("t.name", [1], publish_on_commit=False)
    outbox.enqueue("t.name", [2], publish_on_commit=False)
    broker.side_effect = [None, error, None]
    assert outbox.relay(quiet=True) == 1
    assert OutboxMessage.objects.pending().count() == 1  # kept for the next run, not failed
    assert not OutboxMessage.objects.failed().exists()


def test_the_rows_sent_before_a_failure_are_marked(broker: mock.Mock) -> None:
    for name in ("a", "b", "bad", "c"):
        outbox.enqueue("t.name", [name], publish_on_commit=False)
    broker.side_effect = [None, None, QueueNotFound("gone"), BrokerDown("gone")]
    assert outbox.relay(quiet=True) == 2
    published = OutboxMessage.objects.filter(published_at__isnull=False)
    assert sorted(m.args[0] for m in published) == ["a", "b"]
    assert OutboxMessage.objects.failed().get().args == ["bad"]
    assert OutboxMessage.objects.pending().get().args == ["c"]


def test_an_unexpected_error_sets_a_row_aside_only_once_a_later_row_went_through(
    broker: mock.Mock,
) -> None:
    for name in ("odd", "next"):
        outbox.enqueue("t.name", [name], publish_on_commit=False)
    # Every publish fails the same unexpected way: the process, not the rows, is at fault.
    broker.side_effect = RuntimeError("Acquire on closed pool")
    result = outbox.relay_messages()
    assert (result.published, result.failed, result.held) == (0, 0, 2)
    assert not OutboxMessage.objects.failed().exists()
    assert set(OutboxMessage.objects.pending().values_list("attempts", flat=True)) == {1}
    assert "Acquire on closed pool" in OutboxMessage.objects.first().last_error  # type: ignore[union-attr]
    # Only "odd" still fails, and "next" goes through after it: "odd" is at fault.
    broker.side_effect = [RuntimeError("odd"), None]
    result = outbox.relay_messages()
    assert (result.published, result.failed, result.held) == (1, 1, 0)
    assert OutboxMessage.objects.failed().get().args == ["odd"]


def test_an_interrupt_mid_batch_still_marks_what_was_sent(broker: mock.Mock) -> None:
    for n in range(3):
        outbox.enqueue("t.name", [n], publish_on_commit=False)
    broker.side_effect = [None, KeyboardInterrupt, None]
    with pytest.raises(KeyboardInterrupt):
        outbox.relay()
    assert OutboxMessage.objects.filter(published_at__isnull=False).get().args == [0]
    assert OutboxMessage.objects.pending().count() == 2


def test_redrive_puts_failed_rows_back(broker: mock.Mock) -> None:
    outbox.enqueue("t.name", ["bad"], publish_on_commit=False)
    broker.side_effect = refuse("bad")
    outbox.relay()
    assert OutboxMessage.objects.redrive() == 1  # the queryset method, on every row
    message = OutboxMessage.objects.get()
    assert message.failed_at is None
    assert "QueueNotFound" in message.last_error  # its history is kept
    broker.side_effect = None  # the cause fixed
    assert outbox.relay() == 1
    assert OutboxMessage.objects.redrive() == 0  # published rows are not failed


def test_the_command_sets_bad_rows_aside_and_retries_them_on_request(broker: mock.Mock) -> None:
    from io import StringIO

    for name in ("good-1", "bad", "good-2"):
        outbox.enqueue("t.name", [name], publish_on_commit=False)
    broker.side_effect = refuse("bad")
    out = StringIO()
    call_command("relay_outbox", stdout=out)  # exits 0
    assert "published 2 message(s)" in out.getvalue()
    assert "0 pending, 1 failed (1 set aside just now)" in out.getvalue()
    out = StringIO()
    call_command("relay_outbox", stdout=out)
    assert "published 0 message(s)" in out.getvalue()
    broker.side_effect = None
    out = StringIO()
    call_command("relay_outbox", "--retry-failed", stdout=out)
    assert "re-drove 1 failed message(s)" in out.getvalue()
    assert "published 1 message(s)" in out.getvalue()
    assert "0 pending, 0 failed" in out.getvalue()


def test_relay_forever_never_exits_on_a_bad_row(broker: mock.Mock) -> None:
    from io import StringIO

    for name in ("good-1", "bad", "good-2"):
        outbox.enqueue("t.name", [name], publish_on_commit=False)
    broker.side_effect = refuse("bad")
    polls: list[int] = []

    def sleep(seconds: float) -> None:
        polls.append(OutboxMessage.objects.pending().count())
        if len(polls) == 1:
            outbox.enqueue("t.name", ["good-3"], publish_on_commit=False)
        else:
            raise KeyboardInterrupt  # Ctrl-C

    out = StringIO()
    with mock.patch("idempotency.management.commands.relay_outbox.time.sleep", sleep):
        call_command("relay_outbox", "--forever", "--interval", "0.01", stdout=out)
    assert polls == [0, 0]  # it went on polling after the bad row, and published good-3
    assert out.getvalue().strip().endswith("stopped")
    assert OutboxMessage.objects.filter(published_at__isnull=False).count() == 3
    assert OutboxMessage.objects.failed().get().args == ["bad"]


def test_relay_forever_waits_out_a_broker_outage(broker: mock.Mock) -> None:
    from io import StringIO

    outbox.enqueue("t.name", [1], publish_on_commit=False)
    broker.side_effect = [BrokerDown("down"), BrokerDown("down"), None]
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) == 3:
            raise KeyboardInterrupt

    err = StringIO()
    with mock.patch("idempotency.management.commands.relay_outbox.time.sleep", sleep):
        call_command(
            "relay_outbox", "--forever", "--interval", "0.5", stdout=StringIO(), stderr=err
        )
    assert waits == [0.5, 1.0, 0.5]  # backs off while the broker is away, then polls again
    assert err.getvalue().count("broker unavailable") == 2
    assert not OutboxMessage.objects.pending().exists()


# --- After the commit: one attempt per transaction, nothing raised into the producer --------


def test_one_attempt_for_all_the_messages_of_a_transaction(
    app: mock.Mock, django_capture_on_commit_callbacks: Any
) -> None:
    with django_capture_on_commit_callbacks(execute=True) as callbacks, transaction.atomic():
        for n in range(5):
            outbox.enqueue("t.name", [n])
    assert len(callbacks) == 1
    assert app.send_task.call_count == 5
    # One connection, connected once, with no retry loop and a bounded time.
    ensure = app.connection_for_write.return_value.ensure_connection
    ensure.assert_called_once()
    assert ensure.call_args.kwargs["max_retries"] == 0
    assert 0 < ensure.call_args.kwargs["timeout"] <= 1
    for call in app.send_task.call_args_list:
        assert call.kwargs["retry"] is False
        assert 0 < call.kwargs["confirm_timeout"] <= 1
    assert not OutboxMessage.objects.pending().exists()


def test_a_rolled_back_savepoint_does_not_lose_the_other_messages(
    broker: mock.Mock, django_capture_on_commit_callbacks: Any
) -> None:
    class Abort(Exception):
        pass

    with django_capture_on_commit_callbacks(execute=True), transaction.atomic():
        with pytest.raises(Abort), transaction.atomic():
            outbox.enqueue("t.name", ["rolled back"])
            raise Abort
        outbox.enqueue("t.name", ["kept"])
    assert [c.kwargs["args"] for c in broker.call_args_list] == [["kept"]]
    assert OutboxMessage.objects.get().published_at is not None


def test_nothing_raises_into_the_producer_after_its_commit(
    app: mock.Mock, django_capture_on_commit_callbacks: Any
) -> None:
    app.connection_for_write.side_effect = ValueError("a broker URL Celery cannot parse")
    with django_capture_on_commit_callbacks(execute=True), transaction.atomic():
        outbox.enqueue("t.name", [1])
    message = OutboxMessage.objects.get()
    assert message.published_at is None
    assert message.failed_at is None  # the relay owes it
    assert "cannot parse" in message.last_error


def test_an_open_breaker_skips_the_attempt_until_its_cooldown_ends(
    app: mock.Mock, django_capture_on_commit_callbacks: Any
) -> None:
    ensure = app.connection_for_write.return_value.ensure_connection
    ensure.side_effect = BrokerDown("connection refused")
    clock = [1000.0]
    with mock.patch("idempotency.outbox.publish.time.monotonic", side_effect=lambda: clock[0]):
        with django_capture_on_commit_callbacks(execute=True):
            outbox.enqueue("t.name", [1])
        assert ensure.call_count == 1
        clock[0] += 14
        with django_capture_on_commit_callbacks(execute=True):
            outbox.enqueue("t.name", [2])
        assert ensure.call_count == 1  # skipped: the breaker is open (15 s)
        assert OutboxMessage.objects.get(args=[2]).attempts == 0
        clock[0] += 2
        ensure.side_effect = None
        with django_capture_on_commit_callbacks(execute=True):
            outbox.enqueue("t.name", [3])
        assert ensure.call_count == 2  # tried again, and it worked
        assert OutboxMessage.objects.get(args=[3]).published_at is not None
    assert OutboxMessage.objects.pending().count() == 2  # 1 and 2: the relay publishes them
    assert outbox.relay() == 2


def test_a_kept_connection_that_died_is_replaced_once(
    app: mock.Mock, django_capture_on_commit_callbacks: Any
) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        outbox.enqueue("t.name", [1])  # leaves its connection idle for the next commit
    app.send_task.side_effect = [BrokerDown("connection reset by peer"), None]
    with django_capture_on_commit_callbacks(execute=True):
        outbox.enqueue("t.name", [2])
    assert OutboxMessage.objects.get(args=[2]).published_at is not None
    assert not outbox.publisher.is_open(publish._broker_key())


@pytest.mark.django_db(transaction=True)
def test_a_real_commit_never_raises_for_a_message_refused_for_good() -> None:
    """The producer's own ``transaction.atomic()``: the publish after it is the real one
    (Celery's own app and broker), and the queue the message names is not configured."""
    with transaction.atomic():
        outbox.enqueue("t.name", [1], options={"queue": "a-queue-no-longer-configured"})
    message = OutboxMessage.objects.get()
    assert message.failed_at is not None
    assert "QueueNotFound" in message.last_error
    assert outbox.relay() == 0  # and the relay neither raises nor tries it again
