"""Admin of the dead letters: read-only, with an explicit, logged re-drive."""

from __future__ import annotations

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils.html import format_html, format_html_join
from django.utils.translation import gettext_lazy as _
from django.utils.translation import ngettext

from ..admin_base import PreciseTimesAdmin, ReadOnlyAdmin, event_link, precise
from . import redriving
from .models import DeadLetter


@admin.register(DeadLetter)
class DeadLetterAdmin(PreciseTimesAdmin, ReadOnlyAdmin):
    list_display = (
        "pk",
        "created_at",
        "reason",
        "task_name",
        "event_id",
        "attempts",
        "redriven_at",
        "event",
    )
    list_filter = ("reason", "task_name", ("redriven_at", admin.EmptyFieldListFilter), "created_at")
    # Ranges of indexes only (the task has its filter): see the inbox's admin.
    search_fields = ("event_id__prefix", "task_id__exact")
    date_hierarchy = "created_at"
    readonly_fields = [
        *(f.name for f in DeadLetter._meta.fields if f.name != "traceback"),
        "traceback_text",
        "event",
    ]
    exclude = ("traceback",)
    actions = ["redrive"]

    @admin.display(description=_("event"))
    def event(self, letter: DeadLetter) -> str:
        return event_link(letter.event_id)

    @admin.display(description=_("traceback"))
    def traceback_text(self, letter: DeadLetter) -> str:
        # Preformatted: a traceback is read by its indentation.
        if not letter.traceback:
            return "-"
        return format_html('<pre class="idem-traceback">{}</pre>', letter.traceback)

    @admin.action(
        description=_("Re-drive selected dead letters (publish them again)"),
        permissions=["change_state"],
    )
    def redrive(self, request: HttpRequest, queryset: QuerySet[DeadLetter]) -> None:
        # redrive() refuses a letter already re-driven (also by a concurrent submission) and
        # one whose consumer already processed the event; the messages below say which.
        result = redriving.redrive(list(queryset))
        done, skipped = result.done, result.skipped
        again = [r.letter for r in result.refused if r.reason == redriving.ALREADY_REDRIVEN]
        processed = {
            r.letter.pk: f"{r.letter.event_id}: {refusal_kind(r)}"
            for r in result.refused
            if r.reason != redriving.ALREADY_REDRIVEN
        }
        for letter in done:
            self.log_change(request, letter, "Re-driven through the outbox.")
        if done:
            links = format_html_join(
                ", ",
                "{}",
                ((event_link(letter.event_id, letter.event_id or "?"),) for letter in done),
            )
            self.message_user(
                request,
                format_html(
                    "{} {}",
                    ngettext(
                        "Re-drove %d dead letter: published again through the outbox; its "
                        "outcome shows on the event's page:",
                        "Re-drove %d dead letters: published again through the outbox; their "
                        "outcomes show on each event's page:",
                        len(done),
                    )
                    % len(done),
                    links,
                ),
                messages.SUCCESS,
            )
        if again:
            self.message_user(
                request,
                ngettext(
                    "%(n)d was left alone: it was already re-driven (%(which)s); its event's "
                    "page shows what became of it.",
                    "%(n)d were left alone: they were already re-driven (%(which)s); their "
                    "events' pages show what became of them.",
                    len(again),
                )
                % {"n": len(again), "which": ", ".join(_when(letter) for letter in again)},
                messages.WARNING,
            )
        if processed:
            self.message_user(
                request,
                ngettext(
                    "%(n)d was left alone: its consumer already processed the event "
                    "(%(which)s). Published again, it would be discarded as a duplicate, or, "
                    "with another payload (a mismatch), dead-lettered again. To apply the new "
                    "payload, forget the inbox record first.",
                    "%(n)d were left alone: their consumers already processed the events "
                    "(%(which)s). Published again, they would be discarded as duplicates, or, "
                    "with another payload (a mismatch), dead-lettered again. To apply a new "
                    "payload, forget the inbox record first.",
                    len(processed),
                )
                % {"n": len(processed), "which": ", ".join(sorted(processed.values()))},
                messages.WARNING,
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


def refusal_kind(refusal: redriving.Refusal) -> str:
    """``payload mismatch``, or the outcome of the inbox record that refused the letter."""
    if refusal.reason == redriving.MISMATCH:
        return str(_("payload mismatch"))
    return str(_("processed")) if refusal.outcome in ("", "processed") else refusal.outcome


def _when(letter: DeadLetter) -> str:
    return f"#{letter.pk} {letter.redrive_count}x, last {precise(letter.redriven_at)}"
