"""The console's place in the admin's index: "Events", a proxy of the inbox with no table."""

from __future__ import annotations

from django.utils.translation import gettext_lazy as _

from ..inbox.models import ProcessedEvent


class Event(ProcessedEvent):
    """The admin's index lists models only; this one puts "Events" there, next to the records,
    and its list is the page that finds an event by its id (``console.admin``)."""

    class Meta:
        proxy = True
        verbose_name = _("event")
        verbose_name_plural = _("find an event")
