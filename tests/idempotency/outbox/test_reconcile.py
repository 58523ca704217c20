"""The outbox reconciler: a published message whose event shows no outcome is sent again.

The broker is mocked here (``app.send_task`` records what reaches it); the loss on a real
broker, the races and two reconcilers at once are in ``test_reconcile_services.py``.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta
from io import StringIO
from typing import Any
from unittest import mock

import pytest
from django.core.management import call_command
from django.db.models.functions import Now
from django.test import override_settings
from kombu.exceptions import OperationalError as BrokerDown

from idempotency import outbox, signals
from idempotency.celery import idempotent_task
from idempotency.clock import database_now
from idempotency.models import DeadLetter, OutboxMessage, ProcessedEvent
from idempotency.outbox import reconciling as reconciler
from idempotency.tasks import reconcile_outbox
from tests.celery_app import mocked_celery_app

pytestmark = pytest.mark.django_db

HOUR = timedelta(hours=1)


@idempotent_task(name="tests.reconcile.plain")
def plain(event: dict[str, Any]) -> None:
    """An idempotent task with the defaults: consumer = its name, key = ``eventId``."""


@idempotent_task(name="tests.reconcile.renamed", consumer="billing", key=("orderId", "paymentId"))
def renamed(event: dict[str, Any]) -> None:
    """Its own consumer name and a composite key: the inbox records neither the task name nor
    the producer's event id."""


@idempotent_task(name="tests.reconcile.random_key", key=lambda event: str(uuid.uuid4()))
def random_key(event: dict[str, Any]) -> None:
    """A key function that draws a new key each call: no record is ever found under it."""


def _order_key(event: dict[str, Any]) -> str:
    return f"order-{event['orderId']}"


@idempotent_task(name="tests.reconcile.key_function", key=_order_key)
def key_function(event: dict[str, Any]) -> None:
    """A deterministic key function: the reconciler looks up the key the worker claims."""


def _not_idempotent(event: Any) -> None:
    """A plain Celery task: nothing records its outcome."""


@pytest.fixture
def broker() -> Iterator[mock.Mock]:
    from kombu.transport.pyamqp import Transport

    with mocked_celery_app() as app:
        app.connection_for_write.return_value.connection_errors = Transport.connection_errors
        app.connection_for_write.return_value.channel_errors = Transport.channel_errors
        yield app.send_task


@pytest.fixture
def not_idempotent() -> Iterator[str]:
    from celery import current_app

    task = current_app.task(name="tests.reconcile.not_idempotent")(_not_idempotent)
    yield task.name
    current_app.tasks.pop(task.name, None)


def published(
    task: str = "tests.reconcile.plain",
    event: Any = None,
    *,
    event_id: str | None = None,
    ago: timedelta = 2 * HOUR,
    republished: int = 0,
) -> OutboxMessage:
    """An outbox row published *ago* (on the database's clock), as the relay leaves it."""
    event = {"eventId": "e-1"} if event is None else event
    if event_id is None:
        event_id = str(event.get("eventId", "")) if isinstance(event, dict) else ""
    message = outbox.enqueue(task, [event], event_id=event_id, publish_on_commit=False)
    when = database_now("default") - ago
    OutboxMessage.objects.filter(pk=message.pk).update(
        created_at=when, published_at=when, republished=republished
    )
    message.refresh_from_db()
    return message


def sent_ids(broker: mock.Mock) -> list[str]:
    return [call.kwargs["task_id"] for call in broker.call_args_list]


# --- The check ---------------------------------------------------------------------------------


def test_a_message_without_an_outcome_is_republished_under_its_task_id(broker: mock.Mock) -> None:
    message = published(event={"eventId": "e-1", "amount": "10"})
    result = outbox.reconcile()
    assert (result.checked, result.republished) == (1, 1)
    assert sent_ids(broker) == [str(message.task_id)]
    assert broker.call_args.args == ("tests.reconcile.plain",)
    assert broker.call_args.kwargs["args"] == [{"eventId": "e-1", "amount": "10"}]
    message.refresh_from_db()
    assert message.republished == 1
    assert message.reconciled_at is None  # checked again later
    assert database_now("default") - message.published_at < timedelta(minutes=1)


def test_nothing_is_checked_before_the_horizon(broker: mock.Mock) -> None:
    published(ago=HOUR - timedelta(minutes=1))
    assert outbox.reconcile().checked == 0
    assert not broker.called


def test_an_inbox_record_closes_the_row_for_good(broker: mock.Mock) -> None:
    message = published()
    ProcessedEvent.objects.create(consumer="tests.reconcile.plain", event_id="e-1")
    result = outbox.reconcile()
    assert (result.confirmed, result.republished) == (1, 0)
    message.refresh_from_db()
    assert message.reconciled_at is not None
    assert not OutboxMessage.objects.unreconciled().exists()
    assert outbox.reconcile().checked == 0  # never looked at again
    assert not broker.called


def test_a_numeric_event_id_is_looked_up_as_the_worker_claims_it(broker: mock.Mock) -> None:
    published(event={"eventId": 10**30}, event_id=str(10**30))
    ProcessedEvent.objects.create(consumer="tests.reconcile.plain", event_id=str(10**30))
    assert outbox.reconcile().confirmed == 1
    assert not broker.called


def test_another_consumers_record_of_the_same_event_is_no_outcome(broker: mock.Mock) -> None:
    published()
    ProcessedEvent.objects.create(consumer="someone.else", event_id="e-1")
    assert outbox.reconcile().republished == 1


def test_the_consumer_and_key_are_the_tasks_own(broker: mock.Mock) -> None:
    event = {"eventId": "e-9", "orderId": "ORD-1", "paymentId": "PAY-1"}
    first = published("tests.reconcile.renamed", event)
    # A record under the task's name or the producer's id is not where the worker claims.
    ProcessedEvent.objects.create(consumer="tests.reconcile.renamed", event_id="ORD-1|PAY-1")
    ProcessedEvent.objects.create(consumer="billing", event_id="e-9")
    assert outbox.reconcile().republished == 1
    ProcessedEvent.objects.create(consumer="billing", event_id="ORD-1|PAY-1")
    OutboxMessage.objects.filter(pk=first.pk).update(published_at=Now() - 3 * HOUR)
    assert outbox.reconcile().confirmed == 1


@pytest.mark.parametrize("by", ["task id", "task and key"])
def test_a_dead_letter_is_an_outcome(broker: mock.Mock, by: str) -> None:
    message = published()
    if by == "task id":  # what the worker stores for an event without a usable key
        DeadLetter.objects.create(reason="invalid_key", task_id=str(message.task_id))
    else:  # a re-driven copy, or one imported from RabbitMQ's dead-letter queue
        DeadLetter.objects.create(
            reason="broker", task_name="tests.reconcile.plain", event_id="e-1", task_id="other"
        )
    assert outbox.reconcile().confirmed == 1
    assert not broker.called


def test_each_check_waits_twice_as_long_as_the_last(broker: mock.Mock) -> None:
    message = published(ago=HOUR + timedelta(minutes=1), republished=1)
    assert outbox.reconcile().waiting == 1  # republished once: its check is due after 2 h
    assert not broker.called
    OutboxMessage.objects.filter(pk=message.pk).update(published_at=Now() - 2 * HOUR)
    assert outbox.reconcile().republished == 1
    message.refresh_from_db()
    assert message.republished == 2
    assert reconciler.span(HOUR, 3) == timedelta(hours=15)


@override_settings(IDEMPOTENCY={"RECONCILE_REPUBLISHES": 2})
def test_after_the_last_republish_the_row_is_set_aside_with_its_reason(broker: mock.Mock) -> None:
    message = published(ago=5 * HOUR, republished=2)
    result = outbox.reconcile()
    assert (result.failed, result.republished) == (1, 0)
    assert not broker.called
    message.refresh_from_db()
    assert message.failed_at is not None
    assert message.published_at is None
    assert "no outcome seen for event 'e-1' of consumer 'tests.reconcile.plain'" in (
        message.last_error
    )
    assert "after 2 republish(es)" in message.last_error
    assert list(OutboxMessage.objects.failed()) == [message]
    # Re-driven like any failed row: pending again, with a fresh republish budget.
    assert OutboxMessage.objects.failed().redrive() == 1
    message.refresh_from_db()
    assert (message.failed_at, message.republished) == (None, 0)
    assert outbox.relay() == 1


@override_settings(IDEMPOTENCY={"RECONCILE_REPUBLISHES": 0})
def test_no_republish_at_all_sets_aside_at_the_first_check(broker: mock.Mock) -> None:
    published()
    assert outbox.reconcile().failed == 1
    assert not broker.called


# --- Never blindly -----------------------------------------------------------------------------


def test_what_cannot_be_verified_is_closed_and_never_republished(
    broker: mock.Mock, not_idempotent: str, caplog: pytest.LogCaptureFixture
) -> None:
    rows = [
        published("tests.reconcile.gone"),  # no such task in this process
        published(not_idempotent),  # nothing records its outcome
        published(event={"eventId": "e-2"}, event_id=""),  # the producer named no event
        published(event={"id": "no eventId here"}, event_id="x"),  # the worker finds no key
        published(event={"eventId": True}),
        published("tests.reconcile.plain", "not a dict", event_id="x"),
    ]
    with caplog.at_level("INFO", logger="idempotency"):
        result = outbox.reconcile()
    assert (result.unverifiable, result.republished) == (len(rows), 0)
    assert not broker.called
    assert not OutboxMessage.objects.unreconciled().exists()
    reasons = caplog.text
    assert "'tests.reconcile.gone' is not registered in this process" in reasons
    assert "is not an @idempotent_task" in reasons
    assert "it has no event id" in reasons
    assert "its event has no usable key" in reasons


def test_a_key_function_is_applied_to_the_event_as_the_worker_applies_it(
    broker: mock.Mock,
) -> None:
    published("tests.reconcile.key_function", {"eventId": "e-1", "orderId": 7})
    assert reconciler.consumer_of(OutboxMessage.objects.get(), reconciler._tasks()) == (
        reconciler.Consumer("tests.reconcile.key_function", "order-7", "default")
    )
    # The worker's own label of the event (delivery limit, dead letters) is the same key.
    assert key_function._event_id([{"orderId": 7}]) == "order-7"
    ProcessedEvent.objects.create(consumer="tests.reconcile.key_function", event_id="order-7")
    assert outbox.reconcile().confirmed == 1
    assert not broker.called


def test_a_key_function_that_is_not_deterministic_is_never_republished(
    broker: mock.Mock, caplog: pytest.LogCaptureFixture
) -> None:
    """The worker claimed one key and applied the effect; the reconciler draws another, finds
    no record under it, and a copy would be claimed under a third: applied twice."""
    published("tests.reconcile.random_key")
    with caplog.at_level("INFO", logger="idempotency"):
        result = outbox.reconcile()
    assert (result.unverifiable, result.republished) == (1, 0)
    assert not broker.called
    assert "its key is not the same twice" in caplog.text


@pytest.mark.parametrize(
    "options",
    [{"countdown": 5 * 3600}, {"eta": "__eta__"}],
    ids=["countdown", "eta"],
)
def test_a_message_held_back_is_checked_from_when_it_is_due_to_run(
    broker: mock.Mock, options: dict[str, Any]
) -> None:
    """Published two hours ago to run in five: no outcome can be there yet."""
    message = published()
    if options.get("eta"):
        options = {"eta": (message.published_at + 5 * HOUR).isoformat()}
    OutboxMessage.objects.filter(pk=message.pk).update(options=options)
    result = outbox.reconcile()
    assert (result.waiting, result.republished) == (1, 0)
    assert not broker.called
    OutboxMessage.objects.filter(pk=message.pk).update(published_at=Now() - 7 * HOUR)
    if options.get("eta"):  # an absolute time does not move with the publish
        OutboxMessage.objects.filter(pk=message.pk).update(
            options={"eta": (database_now("default") - 2 * HOUR).isoformat()}
        )
    assert outbox.reconcile().republished == 1


@pytest.mark.parametrize("countdown", [10**30, -5, "soon", True])
def test_a_countdown_of_any_value_never_breaks_the_run(broker: mock.Mock, countdown: Any) -> None:
    message = published()
    OutboxMessage.objects.filter(pk=message.pk).update(options={"countdown": countdown})
    result = outbox.reconcile()
    assert result.checked + result.waiting == 1


def test_a_message_with_an_expiry_is_never_republished(broker: mock.Mock) -> None:
    """It may have expired unrun, as its producer asked; a copy with a relative expiry would
    run it hours late."""
    message = published()
    OutboxMessage.objects.filter(pk=message.pk).update(options={"expires": 60})
    result = outbox.reconcile()
    assert (result.unverifiable, result.republished) == (1, 0)
    assert not broker.called


def test_the_project_tasks_are_found_in_a_process_that_never_imported_them() -> None:
    """A relay process imports no task module; the reconciler imports them as a worker does."""
    from celery import current_app

    tasks = reconciler._tasks()
    assert tasks is current_app.tasks
    assert "orders.tasks.place_order" in tasks


# --- The look-back: never past the inbox retention ---------------------------------------------


@override_settings(IDEMPOTENCY={"RETENTION": timedelta(days=2)})
def test_a_purged_inbox_record_never_causes_a_republish(broker: mock.Mock) -> None:
    """The effect was applied and its record purged with the retention: republishing the row
    would apply it again. The reconciler does not look back that far."""
    old = published(ago=timedelta(days=2, hours=1))
    ProcessedEvent.objects.create(consumer="tests.reconcile.plain", event_id="e-1")
    ProcessedEvent.objects.filter(event_id="e-1").update(
        processed_at=Now() - timedelta(days=2, minutes=50)
    )
    assert ProcessedEvent.objects.purge() == 1
    # Just inside the look-back (the retention less the horizon), a record would still exist.
    recent = published(event={"eventId": "e-2"}, ago=timedelta(days=1, hours=22))
    result = outbox.reconcile()
    assert (result.expired, result.republished) == (1, 1)
    assert sent_ids(broker) == [str(recent.task_id)]
    old.refresh_from_db()
    assert old.reconciled_at is not None
    assert old.republished == 0


@override_settings(
    IDEMPOTENCY={
        "RETENTION": timedelta(days=30),
        "CONSUMER_RETENTION": {"tests.reconcile.plain": timedelta(hours=6)},
    }
)
def test_the_look_back_is_the_consumers_own_retention(broker: mock.Mock) -> None:
    published(ago=timedelta(hours=5, minutes=30))
    assert outbox.reconcile().expired == 1
    assert not broker.called


def test_the_look_back_counts_from_the_earlier_of_stored_and_published(broker: mock.Mock) -> None:
    """A row stored long ago and published only now (the relay was down for a day) may have an
    inbox record from a first publish whose mark was lost, as old as the row."""
    message = published()
    OutboxMessage.objects.filter(pk=message.pk).update(created_at=Now() - timedelta(days=31))
    assert outbox.reconcile().expired == 1


def _late_record(event_id: str, consumer: str, ago: timedelta) -> None:
    ProcessedEvent.objects.create(consumer=consumer, event_id=event_id)
    ProcessedEvent.objects.filter(consumer=consumer, event_id=event_id).update(
        processed_at=Now() - ago
    )


@pytest.mark.parametrize("consumer", [None, "tests.reconcile.plain"])
def test_a_purge_earlier_than_the_retention_never_causes_a_republish(
    broker: mock.Mock, consumer: str | None
) -> None:
    """The first check found no record (a backlog) and republished; the first copy then ran
    and its record is 20 minutes old at the next check. A purge of records older than 10
    minutes deletes it: the check would see no outcome and send a copy that runs again."""
    applied = published(ago=3 * HOUR, republished=1)
    _late_record("e-1", "tests.reconcile.plain", timedelta(minutes=20))
    # Another consumer's row: kept open when the purge is of one consumer only.
    other = published(
        "tests.reconcile.renamed", {"orderId": "O", "paymentId": "P"}, event_id="x", ago=3 * HOUR
    )
    args = ["--older-than", "10m", *(["--consumer", consumer] if consumer else [])]
    call_command("purge_processed_events", *args, stdout=StringIO())
    assert not ProcessedEvent.objects.filter(event_id="e-1").exists()
    open_rows = OutboxMessage.objects.unreconciled()
    assert not open_rows.filter(pk=applied.pk).exists()  # closed (and maybe purged with it)
    result = outbox.reconcile()
    assert str(applied.task_id) not in sent_ids(broker)
    if consumer is None:  # every consumer was purged
        assert not open_rows.filter(pk=other.pk).exists()
        assert result.checked == 0
    else:
        assert (result.checked, result.republished) == (1, 1)
        assert sent_ids(broker) == [str(other.task_id)]


@override_settings(
    IDEMPOTENCY={
        "CONSUMER_RETENTION": {"billing": timedelta(days=90)},
        "RETENTION": timedelta(days=30),
    }
)
def test_a_purge_earlier_than_the_retention_keeps_the_rows_still_to_check(
    broker: mock.Mock,
) -> None:
    """A consumer keeping its own retention keeps its records, so its open rows stay open; and
    the purge of old outbox rows must not take them either, or a message the broker lost
    before its check would never be sent again."""
    lost = published(
        "tests.reconcile.renamed", {"orderId": "O", "paymentId": "P"}, event_id="x", ago=3 * HOUR
    )
    call_command("purge_processed_events", "--older-than", "10m", stdout=StringIO())
    assert OutboxMessage.objects.unreconciled().filter(pk=lost.pk).exists()
    assert outbox.reconcile().republished == 1
    assert sent_ids(broker) == [str(lost.task_id)]


def test_a_purge_by_the_retention_leaves_the_rows_to_the_look_back(broker: mock.Mock) -> None:
    message = published(ago=3 * HOUR, republished=1)
    _late_record("e-1", "tests.reconcile.plain", timedelta(minutes=20))
    call_command("purge_processed_events", stdout=StringIO())
    assert ProcessedEvent.objects.filter(event_id="e-1").exists()
    assert outbox.reconcile().confirmed == 1
    message.refresh_from_db()
    assert message.reconciled_at is not None
    assert not broker.called


# --- The run ----------------------------------------------------------------------------------


def test_a_broker_outage_stops_the_run_and_keeps_the_rows(broker: mock.Mock) -> None:
    for n in range(3):
        published(event={"eventId": f"e-{n}"})
    broker.side_effect = BrokerDown("connection refused")
    result = outbox.reconcile()
    assert isinstance(result.outage, BrokerDown)
    assert result.republished == 0
    assert OutboxMessage.objects.unreconciled().filter(republished=0).count() == 3
    broker.side_effect = None
    assert outbox.reconcile().republished == 3


def test_bounded_batches_go_through_every_due_row(broker: mock.Mock) -> None:
    for n in range(7):
        published(event={"eventId": f"e-{n}"})
    for n in range(3):  # closed by the first batches; the later ones still reach the rest
        published("tests.reconcile.gone", event={"eventId": f"g-{n}"})
    result = outbox.reconcile(batch_size=2)
    assert (result.checked, result.republished, result.unverifiable) == (10, 7, 3)
    assert len(set(sent_ids(broker))) == 7


@pytest.mark.parametrize("size", [0, -1, True, 1.5, "10", 10_001, 10**30])
def test_a_bad_batch_size_is_refused(size: Any) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        outbox.reconcile(batch_size=size)


@pytest.mark.parametrize(
    "setting",
    [{"RECONCILE_AFTER": 3600}, {"RECONCILE_AFTER": timedelta(0)}, {"RECONCILE_REPUBLISHES": -1}],
)
def test_bad_settings_are_a_configuration_error(setting: dict[str, Any]) -> None:
    from idempotency.exceptions import IdempotencyConfigurationError

    with override_settings(IDEMPOTENCY=setting), pytest.raises(IdempotencyConfigurationError):
        outbox.reconcile()


@override_settings(IDEMPOTENCY={"RECONCILE_AFTER": None})
def test_the_reconciler_can_be_turned_off(broker: mock.Mock) -> None:
    published()
    assert outbox.reconcile().checked == 0


def test_republishes_and_give_ups_are_signalled(broker: mock.Mock) -> None:
    seen: list[tuple[str, str, int]] = []

    def on_republished(*, consumer: str, count: int, **kwargs: Any) -> None:
        seen.append(("republished", consumer, count))

    def on_unresolved(*, consumer: str, count: int, **kwargs: Any) -> None:
        seen.append(("unresolved", consumer, count))

    signals.outbox_republished.connect(on_republished)
    signals.outbox_unresolved.connect(on_unresolved)
    try:
        published()
        published(event={"eventId": "e-2"}, ago=20 * HOUR, republished=3)
        outbox.reconcile()
    finally:
        signals.outbox_republished.disconnect(on_republished)
        signals.outbox_unresolved.disconnect(on_unresolved)
    assert sorted(seen) == [
        ("republished", "tests.reconcile.plain", 1),
        ("unresolved", "tests.reconcile.plain", 1),
    ]


def test_a_raising_receiver_does_not_undo_a_republish(
    broker: mock.Mock, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(**kwargs: Any) -> None:
        raise RuntimeError("a project's receiver with a bug")

    signals.outbox_republished.connect(broken)
    try:
        message = published()
        assert outbox.reconcile().republished == 1
    finally:
        signals.outbox_republished.disconnect(broken)
    message.refresh_from_db()
    assert message.republished == 1  # recorded: the next run does not send it again
    assert "a project's receiver with a bug" in caplog.text


# --- Where it runs ------------------------------------------------------------------------------


def test_the_command_reconciles_once_with_its_counts(broker: mock.Mock) -> None:
    published()
    out = StringIO()
    call_command("relay_outbox", "--reconcile", stdout=out)
    assert "1 republished" in out.getvalue()
    assert broker.call_count == 1


def test_the_command_fails_when_the_broker_is_away_while_it_reconciles(
    broker: mock.Mock,
) -> None:
    from django.core.management import CommandError

    published()
    broker.side_effect = BrokerDown("connection refused")
    with pytest.raises(CommandError, match="broker is unavailable"):
        call_command("relay_outbox", "--reconcile", stdout=StringIO())
    assert OutboxMessage.objects.get().republished == 0  # kept for the next run


def test_the_beat_task_reconciles(broker: mock.Mock) -> None:
    published()
    assert reconcile_outbox() == 1


def test_relay_forever_reconciles_every_so_often(broker: mock.Mock) -> None:
    published()
    clock = [1000.0]
    polls: list[int] = []

    def sleep(seconds: float) -> None:
        polls.append(broker.call_count)
        clock[0] += seconds
        if len(polls) == 4:
            raise KeyboardInterrupt

    out = StringIO()
    with (
        mock.patch("idempotency.management.commands.relay_outbox.time.sleep", sleep),
        mock.patch(
            "idempotency.management.commands.relay_outbox.time.monotonic",
            side_effect=lambda: clock[0],
        ),
    ):
        call_command(
            "relay_outbox", "--forever", "--interval", "10", "--reconcile-every", "25", stdout=out
        )
    # Reconciled at the start (the row republished), then not again before 25 s had passed.
    assert polls == [1, 1, 1, 1]
    assert out.getvalue().count("checked") == 1
    assert OutboxMessage.objects.get().republished == 1


@pytest.mark.parametrize("value", ["-1", "nan", "inf", "x"])
def test_a_bad_reconcile_interval_is_refused(value: str) -> None:
    from django.core.management import CommandError

    with pytest.raises((CommandError, SystemExit)):
        call_command("relay_outbox", "--forever", "--reconcile-every", value, stdout=StringIO())
