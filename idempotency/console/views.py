"""The admin page of one event: ``/admin/idempotency/processedevent/event/<event id>/``."""

from __future__ import annotations

import json
from functools import partial
from typing import Any
from urllib.parse import quote

from django.contrib import admin
from django.core.serializers.json import DjangoJSONEncoder
from django.db import models
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import NoReverseMatch, URLPattern, path, reverse
from django.utils.translation import gettext as _

from ..admin_base import EVENT_URL_NAME, event_url, precise
from .story import LIMIT, event_story, is_known, matching_event_ids

URL_NAME = EVENT_URL_NAME


def urls(site: admin.AdminSite) -> list[URLPattern]:
    """The per-event page and its search, each behind the admin's login."""
    return [
        path(
            "event/",
            site.admin_view(partial(search_view, site=site)),
            name=f"{URL_NAME}_search",
        ),
        path(
            "event/<path:event_id>/",
            site.admin_view(partial(event_view, site=site)),
            name=URL_NAME,
        ),
    ]


def search_url(query: str = "") -> str:
    url = reverse(f"admin:{URL_NAME}_search")
    return f"{url}?q={quote(query, safe='')}" if query else url


def change_url(obj: models.Model) -> str:
    meta = obj._meta
    try:
        return reverse(f"admin:{meta.app_label}_{meta.model_name}_change", args=[obj.pk])
    except NoReverseMatch:
        return ""  # a model with no admin


def may_view(request: HttpRequest, model: type[models.Model]) -> bool:
    meta = model._meta
    user: Any = request.user
    return bool(
        user.has_perm(f"{meta.app_label}.view_{meta.model_name}")
        or user.has_perm(f"{meta.app_label}.change_{meta.model_name}")
    )


def pretty(value: Any) -> str:
    if value is None:
        return ""
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, cls=DjangoJSONEncoder)


def event_view(request: HttpRequest, event_id: str, site: admin.AdminSite) -> HttpResponse:
    """What happened to *event_id*: every record of it, each linked to its own page."""
    from ..models import DeadLetter, IdempotencyKey, OutboxMessage, ProcessedEvent

    story = event_story(event_id)
    shown = {
        "outbox": may_view(request, OutboxMessage),
        "inbox": may_view(request, ProcessedEvent),
        "dead_letters": may_view(request, DeadLetter),
        "keys": may_view(request, IdempotencyKey),
    }
    entities = [
        {"row": row, "model": row._meta.verbose_name, "url": change_url(row)}
        for row in story.entities
        if may_view(request, type(row))
    ]
    timeline = [
        {"at": precise(when), "what": what, "record": record, "url": change_url(record)}
        for when, what, record in story.timeline
        if shown[_kind(record)]
    ]
    context = {
        **site.each_context(request),
        "title": _("Event %(id)s") % {"id": event_id},
        "subtitle": None,
        "event_id": event_id,
        "known": story.known,
        "shown": shown,
        "outbox": [_outbox(m) for m in story.outbox] if shown["outbox"] else [],
        "inbox": [_inbox(r) for r in story.inbox] if shown["inbox"] else [],
        "dead_letters": [_letter(d) for d in story.dead_letters] if shown["dead_letters"] else [],
        "keys": [_key(k) for k in story.keys] if shown["keys"] else [],
        "entities": entities,
        "timeline": timeline,
        "search_url": search_url(),
        "limit": LIMIT,
        "opts": ProcessedEvent._meta,
        "app_label": "idempotency",
    }
    return TemplateResponse(request, "admin/idempotency/event.html", context)


def search_view(request: HttpRequest, site: admin.AdminSite) -> HttpResponse:
    """Find an event by its id or the start of it; one match goes straight to its page."""
    from ..models import ProcessedEvent

    query = str(request.GET.get("q", "")).strip()[:255]
    matches = matching_event_ids(query) if query else []
    if query in matches or (query and is_known(query)):
        # The whole id of a known event: its page, even if other ids start with it too.
        return HttpResponseRedirect(event_url(query))
    if len(matches) == 1:
        return HttpResponseRedirect(event_url(matches[0]))
    context = {
        **site.each_context(request),
        "title": _("Find an event"),
        "subtitle": None,
        "query": query,
        "matches": [{"id": m, "url": event_url(m)} for m in matches[:LIMIT]],
        "more": len(matches) > LIMIT,
        "search_url": search_url(),
        "opts": ProcessedEvent._meta,
        "app_label": "idempotency",
    }
    return TemplateResponse(request, "admin/idempotency/event_search.html", context)


def _kind(record: Any) -> str:
    return {
        "OutboxMessage": "outbox",
        "ProcessedEvent": "inbox",
        "DeadLetter": "dead_letters",
        "IdempotencyKey": "keys",
    }[type(record).__name__]


def _outbox(message: Any) -> dict[str, Any]:
    if message.published_at is not None:
        state = _("published")
    elif message.failed_at is not None:
        state = _("failed")
    else:
        state = _("pending")
    return {
        "obj": message,
        "url": change_url(message),
        "state": state,
        "created_at": precise(message.created_at),
        "published_at": precise(message.published_at),
        "failed_at": precise(message.failed_at),
    }


def _inbox(record: Any) -> dict[str, Any]:
    return {
        "obj": record,
        "url": change_url(record),
        "processed_at": precise(record.processed_at),
        "last_duplicate_at": precise(record.last_duplicate_at),
        "mismatch_at": precise(record.mismatch_at),
        "result": pretty(record.result),
    }


def _letter(letter: Any) -> dict[str, Any]:
    return {
        "obj": letter,
        "url": change_url(letter),
        "created_at": precise(letter.created_at),
        "redriven_at": precise(letter.redriven_at),
    }


def _key(key: Any) -> dict[str, Any]:
    return {"obj": key, "url": change_url(key), "created_at": precise(key.created_at)}
