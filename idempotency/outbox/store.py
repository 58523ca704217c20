"""Storing a task message in the caller's transaction: ``enqueue()``.

The messages a transaction stored are handed to the immediate publish (:mod:`.publish`) by
one ``on_commit`` callback; whatever that misses, the relay (:mod:`.relaying`) publishes.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from django.db import connections, router, transaction

from ..exceptions import InvalidEvent
from .publish import publish_now

if TYPE_CHECKING:
    from .models import OutboxMessage

logger = logging.getLogger("idempotency")


def enqueue(
    task: Any,
    args: Sequence[Any] = (),
    kwargs: dict[str, Any] | None = None,
    *,
    event_id: str = "",
    options: dict[str, Any] | None = None,
    publish_on_commit: bool = True,
) -> OutboxMessage:
    """Store a message for *task* (a task or its name) in the current transaction.

    With *publish_on_commit*, it is published right after the commit, together with the other
    messages the transaction stored (one attempt for all of them); never before the commit, and
    never for a transaction that rolled back. Nothing raises into the caller after its commit.
    """
    from .models import OutboxMessage

    alias = router.db_for_write(OutboxMessage)
    name = task if isinstance(task, str) else task.name
    if isinstance(args, (str, bytes)):
        # list("abc") would quietly become three arguments.
        raise TypeError(f"args must be a list or tuple of arguments, not {type(args).__name__}")
    _check_storable(args, kwargs, options)
    message = OutboxMessage.objects.using(alias).create(
        task_name=name,
        args=list(args),
        kwargs=kwargs or {},
        options=options or {},
        event_id=str(event_id),
    )
    if publish_on_commit:
        _publish_after_commit(alias, message.pk)
    return message


#: A NUL as json.dumps escapes it: ``\u0000`` after an even number of backslashes (an odd
#: number is a literal backslash followed by the text "u0000").
_ESCAPED_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


def _check_storable(*parts: Any) -> None:
    """Refuse, before the insert, what the JSON columns or the broker cannot carry: the
    database would answer with an integrity or data error (or store it for a relay to choke
    on), which a caller would take for an outage. Types JSON has no form for stay TypeError."""
    try:
        text = json.dumps(parts, allow_nan=False, ensure_ascii=False)
        text.encode("utf-8")  # a lone surrogate
    except (ValueError, RecursionError) as exc:
        raise InvalidEvent(f"outbox message arguments cannot be stored: {exc}") from exc
    if _ESCAPED_NUL.search(text):  # json escapes NUL; PostgreSQL refuses it in jsonb
        raise InvalidEvent("outbox message arguments cannot be stored: they hold a NUL character")


class _PublishAfterCommit:
    """The one ``on_commit`` callback of a transaction: publishes the ids it collected."""

    def __init__(self, alias: str) -> None:
        self.alias = alias
        self.ids: list[int] = []
        self.ran = False

    def __call__(self) -> None:
        self.ran = True
        # The transaction has committed: its outcome is durable and the relay owes the rest.
        # Whatever goes wrong now must not reach the producer (a view would answer 500 for
        # accepted data, an inbox claim would report its committed delivery as failed).
        try:
            publish_now(self.ids, using=self.alias)
        except Exception:
            logger.exception("outbox: the publish after commit failed; the relay will publish")


def _publish_after_commit(alias: str, pk: int) -> None:
    connection = connections[alias]
    if not connection.in_atomic_block:
        # Autocommit: the row is committed already.
        callback = _PublishAfterCommit(alias)
        callback.ids.append(pk)
        callback()
        return
    # Join the callback this transaction already has, registered in the atomic block that is
    # open now or one enclosing it (so it runs at the same commit, or is dropped with this row
    # by the same rollback). One in a block that has ended (a sibling savepoint) is left
    # alone: a second callback costs at most one more attempt, which the breaker cuts short.
    open_blocks = set(connection.savepoint_ids)
    for entry in reversed(connection.run_on_commit):  # (savepoint ids, callback, robust)
        joined = entry[1]
        if (
            isinstance(joined, _PublishAfterCommit)
            and joined.alias == alias
            and not joined.ran
            and set(entry[0]) <= open_blocks
        ):
            joined.ids.append(pk)
            return
    callback = _PublishAfterCommit(alias)
    callback.ids.append(pk)
    transaction.on_commit(callback, using=alias, robust=True)
