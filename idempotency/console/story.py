"""Everything the app knows about one event id, gathered from each capability's records."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import quote

from django.db import models
from django.db.models import Q

from ..entities import EventIdField, event_keyed_models, rows_for_event

#: At most this many rows of each kind on one page: an event has a handful; a prefix that
#: matches thousands is narrowed by the search instead.
LIMIT = 50


@dataclass
class EventStory:
    event_id: str
    outbox: list[Any] = field(default_factory=list)
    inbox: list[Any] = field(default_factory=list)
    dead_letters: list[Any] = field(default_factory=list)
    keys: list[Any] = field(default_factory=list)
    entities: list[models.Model] = field(default_factory=list)

    @property
    def known(self) -> bool:
        return any((self.outbox, self.inbox, self.dead_letters, self.keys, self.entities))

    @property
    def timeline(self) -> list[tuple[datetime, str, Any]]:
        """``(when, what, record)`` of every dated step, oldest first."""
        steps: list[tuple[datetime | None, str, Any]] = []
        for key in self.keys:
            steps.append((key.created_at, "key", key))
        for message in self.outbox:
            steps.append((message.created_at, "stored", message))
            steps.append((message.published_at, "published", message))
            steps.append((message.failed_at, "publish failed", message))
        for record in self.inbox:
            steps.append((record.processed_at, str(record.outcome), record))
            steps.append((record.mismatch_at, "mismatch", record))
            steps.append((record.last_duplicate_at, "duplicate", record))
        for letter in self.dead_letters:
            steps.append((letter.created_at, "dead-lettered", letter))
            steps.append((letter.redriven_at, "re-driven", letter))
        dated = [(when, what, record) for when, what, record in steps if when is not None]
        return sorted(dated, key=lambda step: step[0])


def event_story(event_id: str) -> EventStory:
    """The records of *event_id* (exactly that id), each kind newest first."""
    from ..models import DeadLetter, IdempotencyKey, OutboxMessage, ProcessedEvent

    return EventStory(
        event_id=event_id,
        outbox=list(OutboxMessage.objects.filter(event_id=event_id).order_by("-pk")[:LIMIT]),
        inbox=list(ProcessedEvent.objects.for_event(event_id).order_by("consumer")[:LIMIT]),
        dead_letters=list(DeadLetter.objects.filter(event_id=event_id).order_by("-pk")[:LIMIT]),
        keys=keys_of_event(IdempotencyKey.objects.all(), event_id),
        entities=rows_for_event(event_id),
    )


#: The shortest id that names an event in a URL: shorter ones are too often a segment of the
#: path itself (``api``, ``orders``).
SHORTEST_LINKED_ID = 8
#: At most this many keys whose response headers hold the id somewhere are read to find those
#: that name it as a segment of a URL's path.
KEYS_SCANNED = 20 * LIMIT
#: Characters a URL never needs to percent-encode (RFC 3986's unreserved).
_UNRESERVED = re.compile(r"[A-Za-z0-9._~-]+")


def keys_of_event(keys: models.QuerySet[Any], event_id: str, *, limit: int = LIMIT) -> list[Any]:
    """The ``Idempotency-Key`` records whose stored response names *event_id*, newest first.

    A keyed request that hands its work to an event answers where to follow it (a 201 or 202
    with a ``Location`` or ``Content-Location`` naming the event): the stored headers are the
    only link the key keeps. The id must be a whole segment of the URL's path, percent-decoded,
    and compare exactly (case and all, as event ids do). The database narrows the keys to those
    whose headers hold the id's longest run of characters that a URL leaves as they are, the
    rest is read here. Not indexed: the page of one event reads it, no hot path does.
    """
    from ..http.admin import LINK_HEADERS, linked_segments

    if len(event_id) < SHORTEST_LINKED_ID:
        return []
    runs = _UNRESERVED.findall(event_id)
    hints = [max(runs, key=len)] if runs else [event_id, quote(event_id, safe="")]
    narrowed = Q()
    for hint in hints:
        for header in LINK_HEADERS:
            narrowed |= Q(**{f"response_headers__{header}__icontains": hint})
    found = []
    for key in keys.filter(narrowed).order_by("-pk")[:KEYS_SCANNED]:
        if event_id in linked_segments(key):
            found.append(key)
            if len(found) == limit:
                break
    return found


def event_of_key(key: Any) -> str:
    """The event id the key's stored response names, as written, or ``""``.

    The segment of the response's URLs (:func:`~idempotency.http.admin.linked_segments`, the
    last one first) that a record of an event holds (the inbox, the outbox, the dead letters,
    the business rows); failing that, one that is a UUID (its records purged since).
    """
    from ..http.admin import UUID, linked_segments

    segments = [s for s in linked_segments(key) if len(s) >= SHORTEST_LINKED_ID]
    for segment in segments:
        if _recorded(segment):
            return segment
    return next((segment for segment in segments if UUID.fullmatch(segment)), "")


def _recorded(event_id: str) -> bool:
    from ..models import DeadLetter, OutboxMessage, ProcessedEvent

    return (
        ProcessedEvent.objects.for_event(event_id).exists()
        or OutboxMessage.objects.filter(event_id=event_id).exists()
        or DeadLetter.objects.filter(event_id=event_id).exists()
        or bool(rows_for_event(event_id))
    )


def matching_event_ids(prefix: str, *, limit: int = LIMIT) -> list[str]:
    """Event ids that start with *prefix*: in the inbox, the outbox, the dead letters, and the
    business rows (an :class:`~idempotency.entities.EventIdField`), which outlive the purge."""
    from ..models import DeadLetter, OutboxMessage, ProcessedEvent

    prefix = prefix.strip()
    if not prefix:
        return []
    found: set[str] = set()
    for model in (ProcessedEvent, OutboxMessage, DeadLetter):
        ids = (
            model._default_manager.filter(event_id__prefix=prefix)
            .exclude(event_id="")
            .order_by("event_id")
            .values_list("event_id", flat=True)
            .distinct()[: limit + 1]
        )
        found.update(ids)
    found.update(_entity_event_ids(prefix, limit=limit + 1))
    return sorted(found)[: limit + 1]


def _entity_event_ids(prefix: str, *, limit: int) -> set[str]:
    """The ids, as text, of the events that created business rows, starting with *prefix*."""
    found: set[str] = set()
    for model in event_keyed_models():
        for column in model._meta.get_fields():
            if isinstance(column, EventIdField):
                ids = (
                    model._default_manager.filter(**{f"{column.name}__prefix": prefix})
                    .order_by(column.name)
                    .values_list(column.name, flat=True)[:limit]
                )
                found.update(str(each) for each in ids)
    return found


def is_known(event_id: str) -> bool:
    """Whether any record names exactly *event_id*: the search's test for a whole id that no
    prefix found (an event known only by the key whose response names it)."""
    return event_story(event_id).known
