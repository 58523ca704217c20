"""Re-driving dead letters: publish them again, through the outbox and the inbox."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from django.db import transaction

from .store import database

#: Why :func:`redrive` left a letter alone (:attr:`Refusal.reason`).
#: Re-driven before: its event's page shows what became of it. A letter is re-driven once; a
#: re-drive that fails again leaves a dead letter of its own.
ALREADY_REDRIVEN = "already_redriven"
#: Its consumer holds an inbox record of the event: published again, it would be discarded as
#: a duplicate.
PROCESSED = "processed"
#: ... a record whose payload mismatch this letter is: published again, it would be
#: dead-lettered again. To apply the new payload, forget the inbox record first.
MISMATCH = "mismatch"


@dataclass(frozen=True)
class Refusal:
    """A letter :func:`redrive` left alone, and why (one of the reasons above)."""

    letter: Any
    reason: str
    #: For PROCESSED and MISMATCH, the inbox record's outcome (``processed``, ``rejected``).
    outcome: str = ""


@dataclass
class Redrive:
    """What :func:`redrive` did with each letter.

    Unpacks as ``done, skipped`` (``done, skipped = redrive(letters)``), as it did before
    :attr:`refused` was added.
    """

    #: Published again through the outbox, each refreshed (``redriven_at``, ``redrive_count``).
    done: list[Any] = field(default_factory=list)
    #: Cannot be re-driven: it names no task or carries no arguments it could be sent with.
    skipped: list[Any] = field(default_factory=list)
    #: Left alone (see :class:`Refusal`), a letter already re-driven refreshed from the database.
    refused: list[Refusal] = field(default_factory=list)

    def __iter__(self) -> Iterator[list[Any]]:
        return iter((self.done, self.skipped))


def redrive(letters: Iterable[Any]) -> Redrive:
    """Publish each re-drivable letter again, through the outbox, at most once.

    A letter already re-driven is refused, and so is one whose consumer already holds an inbox
    record of its event (:data:`PROCESSED`, :data:`MISMATCH`). The "re-driven" mark is a
    conditional ``UPDATE ... WHERE redriven_at IS NULL`` that commits together with the outbox
    row, on the database the routers write both to: of two concurrent re-drives of one letter
    (two admin submissions, the admin and the command), the second waits on the row and is
    refused. A re-driven event still passes through the inbox.
    """
    from django.db.models import F
    from django.db.models.functions import Now

    from .. import outbox
    from .models import DeadLetter

    using = database()
    result = Redrive()
    for letter in letters:
        if not letter.can_redrive:
            result.skipped.append(letter)
            continue
        if letter.redriven_at is not None:
            result.refused.append(Refusal(letter, ALREADY_REDRIVEN))
            continue
        with transaction.atomic(using=using):
            refusal = _already_processed(letter, using)
            if refusal is None:
                marked = (
                    DeadLetter.objects.using(using)
                    .filter(pk=letter.pk, redriven_at__isnull=True)
                    .update(redriven_at=Now(), redrive_count=F("redrive_count") + 1)
                )
                if marked:
                    outbox.enqueue(
                        letter.task_name, letter.args, letter.kwargs or {}, event_id=letter.event_id
                    )
                else:
                    refusal = Refusal(letter, ALREADY_REDRIVEN)
        if refusal is not None:
            result.refused.append(refusal)
        else:
            result.done.append(letter)
        if refusal is None or refusal.reason == ALREADY_REDRIVEN:
            letter.refresh_from_db(using=using, fields=["redriven_at", "redrive_count"])
    return result


def _already_processed(letter: Any, using: str) -> Refusal | None:
    """The refusal of a letter whose consumer holds an inbox record of its event, or None."""
    from ..inbox.models import ProcessedEvent

    if not letter.event_id:
        return None  # a keyless message: no inbox record can name it
    found = (
        ProcessedEvent.objects.using(using)
        .filter(consumer=letter.task_name, event_id=letter.event_id)
        .values_list("outcome", "mismatch_fingerprint")
        .first()
    )
    if found is None:
        return None
    outcome, mismatch = found
    return Refusal(letter, MISMATCH if mismatch else PROCESSED, str(outcome))
