"""Re-driving dead letters: publish them again, through the outbox and the inbox."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from django.db import transaction

from .store import database


def redrive(letters: Iterable[Any]) -> tuple[list[Any], list[Any]]:
    """Publish each re-drivable letter again, through the outbox; ``(re-driven, skipped)``.

    A re-driven event still passes through the inbox, so one that did get processed after all
    is discarded as a duplicate. Each letter's outbox row and its "re-driven" mark commit
    together, on the database the routers write both to.
    """
    from django.db.models import F
    from django.db.models.functions import Now

    from .. import outbox
    from .models import DeadLetter

    using = database()
    done, skipped = [], []
    for letter in letters:
        if not letter.can_redrive:
            skipped.append(letter)
            continue
        with transaction.atomic(using=using):
            outbox.enqueue(
                letter.task_name, letter.args, letter.kwargs or {}, event_id=letter.event_id
            )
            DeadLetter.objects.using(using).filter(pk=letter.pk).update(
                redriven_at=Now(), redrive_count=F("redrive_count") + 1
            )
        letter.refresh_from_db(using=using, fields=["redriven_at", "redrive_count"])
        done.append(letter)
    return done, skipped
