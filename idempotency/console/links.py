"""Links to the per-event page, for every admin that shows an event id."""

from __future__ import annotations

from typing import Any

from django.utils.html import format_html
from django.utils.translation import gettext as _


def event_link(event_id: Any, text: str | None = None) -> str:
    """ "What happened to it", linking to the event's page; ``-`` without an event id."""
    from .views import event_url

    url = event_url(event_id) if event_id not in (None, "") else ""
    if not url:
        return "-"
    return format_html(
        '<a href="{}" class="idem-event-link">{}</a>', url, text or _("what happened to it")
    )
