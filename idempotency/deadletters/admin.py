"""Admin of the dead letters: read-only, with an explicit, logged re-drive."""

from __future__ import annotations

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils.translation import gettext_lazy as _
from django.utils.translation import ngettext

from ..admin_base import ReadOnlyAdmin
from . import redriving
from .models import DeadLetter


@admin.register(DeadLetter)
class DeadLetterAdmin(ReadOnlyAdmin):
    list_display = (
        "pk",
        "created_at",
        "reason",
        "task_name",
        "event_id",
        "attempts",
        "redriven_at",
    )
    list_filter = ("reason", "task_name", ("redriven_at", admin.EmptyFieldListFilter), "created_at")
    search_fields = ("=event_id", "=task_id", "task_name")
    date_hierarchy = "created_at"
    readonly_fields = [f.name for f in DeadLetter._meta.fields]
    actions = ["redrive"]

    @admin.action(
        description=_("Re-drive selected dead letters (publish them again)"),
        permissions=["change_state"],
    )
    def redrive(self, request: HttpRequest, queryset: QuerySet[DeadLetter]) -> None:
        done, skipped = redriving.redrive(queryset)
        for letter in done:
            self.log_change(request, letter, "Re-driven through the outbox.")
        if done:
            self.message_user(
                request,
                ngettext("Re-drove %d dead letter.", "Re-drove %d dead letters.", len(done))
                % len(done),
                messages.SUCCESS,
            )
        if skipped:
            self.message_user(
                request,
                _("%(n)d could not be re-driven: they name no task or carry no arguments.")
                % {"n": len(skipped)},
                messages.WARNING,
            )

    def has_change_state_permission(self, request: HttpRequest) -> bool:
        # Re-driving publishes messages: as strong as deleting the record of a failure.
        return self.has_delete_permission(request)
