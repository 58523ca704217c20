"""Dead letters: what can never succeed is kept, listed and re-driven, not dropped or looped."""

from __future__ import annotations

from io import StringIO
from typing import Any
from unittest import mock

import pytest
from celery.exceptions import Reject
from django.core.management import CommandError, call_command

from idempotency.celery import DeadLetterConsumer, idempotent_task
from idempotency.models import DeadLetter, OutboxMessage, ProcessedEvent

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


def test_transient_database_errors_are_retried() -> None:
    from django.db import OperationalError

    assert OperationalError in flaky.autoretry_for
    assert LookupError in flaky.autoretry_for
    assert flaky.acks_on_failure_or_timeout is False


def test_redrive_after_a_fix(django_capture_on_commit_callbacks: Any) -> None:
    flaky.apply(args=[{"eventId": "e-3", "fail": True}], retries=2)
    letter = DeadLetter.objects.get()
    out = StringIO()
    call_command("dead_letters", "list", stdout=out)
    assert f"{letter.pk:>6}" in out.getvalue()
    assert "1 dead letter(s) pending" in out.getvalue()
    with mock.patch("idempotency.outbox.current_app") as app:
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
