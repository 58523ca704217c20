"""Dead letters: what can never succeed is kept, listed and re-driven, not dropped or looped."""

from __future__ import annotations

from io import StringIO
from typing import Any
from unittest import mock

import pytest
from celery.exceptions import Reject
from django.core.management import CommandError, call_command
from django.db import OperationalError

from idempotency import deadletters
from idempotency.celery import DeadLetterConsumer, idempotent_task
from idempotency.models import DeadLetter, OutboxMessage, ProcessedEvent
from tests.celery_app import mocked_celery_app

pytestmark = pytest.mark.django_db

attempts: list[Any] = []


@idempotent_task(max_retries=2, autoretry_for=(LookupError,), retry_backoff=False)
def flaky(event: dict[str, Any]) -> str:
    attempts.append(event)
    if event.get("fail"):
        raise LookupError("not yet")
    return "ok"


@idempotent_task
def broken(event: dict[str, Any]) -> None:
    raise ValueError("a bug in the handler")


@pytest.fixture(autouse=True)
def _reset() -> None:
    attempts.clear()


def test_a_keyless_message_becomes_a_dead_letter() -> None:
    result = flaky.apply(args=[{"orderId": "ORD-1"}])
    assert isinstance(result.result, Reject)
    letter = DeadLetter.objects.get()
    assert letter.reason == DeadLetter.Reason.INVALID_KEY
    assert letter.task_name == flaky.name
    assert letter.args == [{"orderId": "ORD-1"}]
    assert "eventId" in letter.exception
    assert not attempts


def test_a_handler_failing_for_good_becomes_a_dead_letter_once() -> None:
    result = broken.apply(args=[{"eventId": "e-1"}])
    assert isinstance(result.result, ValueError)
    letter = DeadLetter.objects.get()
    assert (letter.reason, letter.event_id) == (DeadLetter.Reason.FAILED, "e-1")
    assert "a bug in the handler" in letter.exception
    assert "ValueError" in letter.traceback
    assert not ProcessedEvent.objects.exists()  # the claim rolled back with the failure


def test_retries_run_out_then_dead_letter() -> None:
    with mock.patch.object(flaky, "retry", wraps=flaky.retry) as retry:
        flaky.apply(args=[{"eventId": "e-2", "fail": True}], retries=2)
    assert retry.called
    letter = DeadLetter.objects.get()
    assert letter.attempts == 3
    assert letter.event_id == "e-2"


def test_transient_database_errors_do_not_spend_retries() -> None:
    from django.db import OperationalError

    # Waited out in-process (tests/idempotency/celery/test_celery.py), never retried with a
    # countdown.
    assert flaky.retry_for == (LookupError,)
    assert not issubclass(OperationalError, flaky.retry_for)
    assert flaky.acks_on_failure_or_timeout is False


def test_redrive_after_a_fix(django_capture_on_commit_callbacks: Any) -> None:
    flaky.apply(args=[{"eventId": "e-3", "fail": True}], retries=2)
    letter = DeadLetter.objects.get()
    out = StringIO()
    call_command("dead_letters", "list", stdout=out)
    assert f"{letter.pk:>6}" in out.getvalue()
    assert "1 dead letter(s) pending" in out.getvalue()
    with mocked_celery_app() as app:
        with django_capture_on_commit_callbacks(execute=True):
            call_command("dead_letters", "redrive", str(letter.pk), stdout=StringIO())
        assert app.send_task.call_args.args == (flaky.name,)
        assert app.send_task.call_args.kwargs["args"] == [{"eventId": "e-3", "fail": True}]
    letter.refresh_from_db()
    assert letter.redriven_at is not None
    assert OutboxMessage.objects.get().published_at is not None
    out = StringIO()
    call_command("dead_letters", "list", stdout=out)
    assert "0 dead letter(s) pending" in out.getvalue()


def test_the_command_refuses_bad_arguments() -> None:
    with pytest.raises(CommandError, match="no dead letter 404"):
        call_command("dead_letters", "show", "404", stdout=StringIO())
    with pytest.raises(CommandError, match="not both"):
        call_command("dead_letters", "redrive", stdout=StringIO())


def test_an_undecodable_message_is_kept_not_dropped() -> None:
    consumer = mock.Mock(spec=DeadLetterConsumer)
    message = mock.Mock(body=b"{not json", headers={"task": "orders.tasks.place_order"})
    with mock.patch("celery.worker.consumer.Consumer.on_decode_error") as original:
        DeadLetterConsumer.on_decode_error(consumer, message, ValueError("bad json"))
    original.assert_called_once()
    letter = DeadLetter.objects.get()
    assert (letter.reason, letter.body) == (DeadLetter.Reason.UNDECODABLE, "{not json")
    assert not letter.can_redrive
    out = StringIO()
    call_command("dead_letters", "redrive", "--all", stdout=out, stderr=out)
    assert "cannot be re-driven" in out.getvalue()


# --- record() never raises -----------------------------------------------------------------------


def nested(depth: int) -> Any:
    value: Any = {"eventId": "deep"}
    for _ in range(depth):
        value = {"child": value}
    return value


class Hostile:
    def __repr__(self) -> str:
        raise RuntimeError("no repr for you")


def test_a_deeply_nested_payload_is_stored_as_text() -> None:
    letter = deadletters.record(reason="failed", task_name="t", args=[nested(950)])
    assert letter is not None
    letter.refresh_from_db()
    assert letter.args is None  # no JSON form within the depth kept
    assert letter.body.startswith("args: [{'child': {'child'")
    assert not letter.can_redrive


def test_an_object_whose_repr_raises_is_stored() -> None:
    letter = deadletters.record(
        reason="failed",
        task_name="t",
        args=[{"eventId": "e-1", "thing": Hostile()}],
        exception=RecursionError("maximum recursion depth exceeded"),
    )
    assert letter is not None
    letter.refresh_from_db()
    assert letter.args[0]["eventId"] == "e-1"
    assert letter.args[0]["thing"].startswith("<Hostile instance at")
    assert "RecursionError" in letter.exception


def test_nul_bytes_lone_surrogates_and_nan_are_stored() -> None:
    letter = deadletters.record(
        reason="failed",
        task_name="t\x00",
        event_id="e\x00-1",
        args=[{"eventId": "e\x00-1", "note": "bad \ud800 half", "ratio": float("nan")}],
        kwargs={"k\x00": "v"},
        headers={"x": "\x00"},
        body="raw\x00body",
        exception=ValueError("nul \x00 inside"),
        traceback="line\x00",
    )
    assert letter is not None
    letter.refresh_from_db()
    assert letter.event_id == "e\\x00-1"
    assert letter.args == [{"eventId": "e\\x00-1", "note": "bad \\ud800 half", "ratio": "nan"}]
    assert letter.kwargs == {"k\\x00": "v"}
    assert letter.body == "raw\\x00body"
    assert "\x00" not in letter.exception + letter.traceback + letter.task_name


def test_an_oversized_payload_is_kept_as_cut_text() -> None:
    with mock.patch("idempotency.deadletters.store._MAX_JSON", 1000):
        letter = deadletters.record(reason="failed", task_name="t", args=[{"blob": "x" * 5000}])
    assert letter is not None
    letter.refresh_from_db()
    assert letter.args is None
    assert "xxxx" in letter.body
    assert len(letter.body) <= 64 * 1024


@pytest.mark.parametrize(
    "error",
    [
        OperationalError("the database is down"),
        UnicodeEncodeError("utf-8", "x", 0, 1, "a driver's encoding error"),
        RecursionError("maximum recursion depth exceeded"),
    ],
)
def test_a_failure_to_store_returns_none_and_logs_critical(
    error: Exception, caplog: pytest.LogCaptureFixture
) -> None:
    with mock.patch("idempotency.deadletters.store._store", side_effect=error):
        assert deadletters.record(reason="failed", task_name="t", args=[nested(950)]) is None
    assert "could not store a dead letter" in caplog.text
    assert not DeadLetter.objects.exists()


def test_an_undecodable_message_that_cannot_be_stored_is_not_dropped() -> None:
    consumer = mock.Mock(spec=DeadLetterConsumer, give_back_pause=0, connection=mock.Mock())
    consumer.connection.transport.driver_type = "redis"
    message = mock.Mock(body=b"{not json", headers={"id": "t-1"})
    with (
        mock.patch("idempotency.deadletters.store._store", side_effect=OperationalError("down")),
        mock.patch("celery.worker.consumer.Consumer.on_decode_error") as original,
    ):
        DeadLetterConsumer.on_decode_error(consumer, message, ValueError("bad json"))
        consumer._keep.assert_called_once_with(message)
        DeadLetterConsumer._keep(consumer, message)
    original.assert_not_called()  # Celery's would acknowledge it: gone
    message.reject.assert_called_once_with(requeue=True)
    message.ack.assert_not_called()
    consumer.connection.transport.driver_type = "amqp"
    message.reset_mock()
    DeadLetterConsumer._keep(consumer, message)
    message.reject.assert_called_once_with(requeue=False)  # to <queue>.dead, for import


def test_the_undecodable_letter_keeps_the_task_id() -> None:
    consumer = mock.Mock(spec=DeadLetterConsumer)
    message = mock.Mock(body=b"\x00\xff", headers={"id": "t-7", "task": "x.y"})
    with mock.patch("celery.worker.consumer.Consumer.on_decode_error"):
        DeadLetterConsumer.on_decode_error(consumer, message, ValueError("bad"))
    letter = DeadLetter.objects.get()
    assert (letter.task_id, letter.task_name) == ("t-7", "x.y")
    assert "\x00" not in letter.body
