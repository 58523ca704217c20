"""A dead letter is re-driven once, and never when its consumer already processed the event.

``redrive()`` itself refuses (the admin, the command and code all go through it): a letter
already re-driven, with a conditional ``UPDATE`` so that two concurrent re-drives of one letter
enqueue it once; and a letter whose consumer holds an inbox record of the event (published
again it would be discarded as a duplicate or, for a payload mismatch, dead-lettered again).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from io import StringIO
from typing import Any

import pytest
from django.core.management import call_command
from django.utils import timezone

from idempotency import deadletters, outbox
from idempotency.deadletters import redriving
from idempotency.models import DeadLetter, OutboxMessage, ProcessedEvent
from tests.celery_app import mocked_celery_app
from tests.services import in_thread, lock_waiters, require_row_locks, wait_for

TASK = "orders.tasks.payment_received"
TIMEOUT = 20


@pytest.fixture(autouse=True)
def _no_broker() -> Iterator[Any]:
    with mocked_celery_app() as app:
        yield app


def letter(event_id: str, **fields: Any) -> DeadLetter:
    return DeadLetter.objects.create(
        reason="failed", task_name=TASK, event_id=event_id, args=[{"eventId": event_id}], **fields
    )


def record(event_id: str, *, mismatch: bool = False) -> ProcessedEvent:
    return ProcessedEvent.objects.create(
        consumer=TASK,
        event_id=event_id,
        fingerprint="a" * 64,
        mismatch_fingerprint="b" * 64 if mismatch else "",
    )


def redrive_command(*ids: int) -> tuple[str, str]:
    out, err = StringIO(), StringIO()
    call_command("dead_letters", "redrive", *map(str, ids), stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


@pytest.mark.django_db
def test_the_command_leaves_a_letter_already_redriven_alone() -> None:
    done = letter("ev-again-1", redriven_at=timezone.now(), redrive_count=1)
    out, err = redrive_command(done.pk)
    assert "re-drove 0 dead letter(s)" in out
    assert f"dead letter {done.pk} left alone: already re-driven (1x, last " in err
    assert OutboxMessage.objects.count() == 0
    done.refresh_from_db()
    assert done.redrive_count == 1


@pytest.mark.django_db
def test_the_command_leaves_a_mismatch_letter_alone_and_says_why() -> None:
    record("ev-mm-1", mismatch=True)
    mismatched = letter("ev-mm-1")
    out, err = redrive_command(mismatched.pk)
    assert "re-drove 0 dead letter(s)" in out
    assert f"dead letter {mismatched.pk} left alone: {TASK} already processed ev-mm-1" in err
    assert "payload mismatch" in err
    assert "forget the inbox record first" in err
    assert OutboxMessage.objects.count() == 0
    mismatched.refresh_from_db()
    assert mismatched.redriven_at is None


@pytest.mark.django_db
def test_the_command_leaves_a_letter_of_a_processed_event_alone() -> None:
    record("ev-done-1")
    processed = letter("ev-done-1")
    ready = letter("ev-ready-1")
    out, err = redrive_command(processed.pk, ready.pk)
    assert "re-drove 1 dead letter(s)" in out
    assert f"dead letter {processed.pk} left alone: {TASK} already processed ev-done-1" in err
    assert "discarded as a duplicate" in err
    assert list(OutboxMessage.objects.values_list("event_id", flat=True)) == ["ev-ready-1"]


@pytest.mark.django_db
def test_redrive_reports_each_refusal_and_still_unpacks_as_done_and_skipped() -> None:
    record("ev-mm-2", mismatch=True)
    record("ev-done-2")
    letters = [
        letter("ev-ready-2"),
        letter("ev-again-2", redriven_at=timezone.now(), redrive_count=1),
        letter("ev-mm-2"),
        letter("ev-done-2"),
        DeadLetter.objects.create(reason="undecodable", body="{not json"),
    ]
    result = deadletters.redrive(letters)
    assert result.done == letters[:1]
    assert result.skipped == letters[4:]
    assert [(r.letter, r.reason) for r in result.refused] == [
        (letters[1], redriving.ALREADY_REDRIVEN),
        (letters[2], redriving.MISMATCH),
        (letters[3], redriving.PROCESSED),
    ]
    done, skipped = result
    assert (done, skipped) == (letters[:1], letters[4:])
    assert OutboxMessage.objects.count() == 1


@pytest.mark.django_db
def test_a_stale_copy_of_a_letter_is_not_redriven_again() -> None:
    """Two admin submissions read the letter before either re-drove it."""
    first = letter("ev-stale-1")
    second = DeadLetter.objects.get(pk=first.pk)
    assert [each.pk for each in deadletters.redrive([first]).done] == [first.pk]
    result = deadletters.redrive([second])
    assert result.done == []
    assert [(r.letter.pk, r.reason) for r in result.refused] == [
        (first.pk, redriving.ALREADY_REDRIVEN)
    ]
    assert second.redrive_count == 1  # refreshed: the message says when it was
    assert OutboxMessage.objects.count() == 1


@pytest.mark.services
@pytest.mark.django_db(transaction=True)
def test_two_concurrent_redrives_of_one_letter_enqueue_it_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    require_row_locks()
    target = letter("ev-race-1")
    copies = [DeadLetter.objects.get(pk=target.pk) for _ in range(2)]
    inside, release = threading.Event(), threading.Event()
    enqueued: list[str] = []
    real = outbox.enqueue

    def slow_enqueue(*args: Any, **kwargs: Any) -> Any:
        enqueued.append(threading.current_thread().name)
        if len(enqueued) == 1:  # the first holds its transaction open
            inside.set()
            release.wait(TIMEOUT)
        return real(*args, **kwargs)

    monkeypatch.setattr(outbox, "enqueue", slow_enqueue)
    results: list[Any] = []
    errors: list[BaseException] = []
    first = in_thread(lambda: results.append(deadletters.redrive([copies[0]])), errors)
    assert inside.wait(TIMEOUT)
    second = in_thread(lambda: results.append(deadletters.redrive([copies[1]])), errors)
    try:
        # The second waits on the letter's row, locked by the first's UPDATE.
        wait_for(lambda: lock_waiters() >= 1, TIMEOUT, "the second re-drive to wait on the row")
    finally:
        release.set()
        first.join(TIMEOUT)
        second.join(TIMEOUT)
    assert not errors, errors
    assert len(enqueued) == 1
    assert sorted(len(r.done) for r in results) == [0, 1]
    assert [r.reason for result in results for r in result.refused] == [redriving.ALREADY_REDRIVEN]
    assert OutboxMessage.objects.filter(event_id="ev-race-1").count() == 1
    target.refresh_from_db()
    assert target.redrive_count == 1
