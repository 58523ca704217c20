"""Admin of the inbox: read-only audit of processed events, with logged forget and re-drive."""

from __future__ import annotations

import difflib
import json
import logging
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from typing import Any

from django.contrib import admin, messages
from django.contrib.admin.models import DELETION, LogEntry
from django.core.serializers.json import DjangoJSONEncoder
from django.db import DEFAULT_DB_ALIAS, router, transaction
from django.db.models import Count, Q, QuerySet, Sum
from django.db.models.functions import Coalesce, TruncDate
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import NoReverseMatch, URLPattern, reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString, mark_safe
from django.utils.translation import gettext, ngettext
from django.utils.translation import gettext_lazy as _

from ..admin_base import PreciseTimesAdmin, event_link
from ..conf import app_settings
from ..entities import rows_for_event
from .models import Outcome, ProcessedEvent

logger = logging.getLogger("idempotency")

#: Days shown by the changelist's records-per-day chart.
CHART_DAYS = 30


class MismatchFilter(admin.SimpleListFilter):
    title = _("payload mismatch")
    parameter_name = "mismatch"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, Any]]:
        return [("yes", _("Yes")), ("no", _("No"))]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        if self.value() == "yes":
            return queryset.exclude(mismatch_fingerprint="")
        if self.value() == "no":
            return queryset.filter(mismatch_fingerprint="")
        return queryset


@admin.register(ProcessedEvent)
class ProcessedEventAdmin(PreciseTimesAdmin):
    """An audit log: nothing is added or edited here; forgetting a record is explicit and logged."""

    list_display = ("event_id", "consumer", "outcome", "processed_at", "has_mismatch", "event")
    list_filter = ("consumer", "outcome", MismatchFilter, "processed_at")
    # The start of an id is enough: a UUID's first characters name one event in practice. A
    # range of the unique index (idempotency.fields.Prefix), not a LIKE that reads every record;
    # nothing else, as any LIKE OR'd with it would read them all again (the consumer has its
    # filter).
    search_fields = ("event_id__prefix",)
    date_hierarchy = "processed_at"
    ordering = ("-processed_at",)
    readonly_fields = [
        *(f.name for f in ProcessedEvent._meta.fields),
        "business_entities",
        "payload_diff",
        "event",
    ]
    fieldsets = [
        (
            None,
            {
                "fields": [
                    "consumer",
                    "event_id",
                    "event",
                    "processed_at",
                    "outcome",
                    "reason",
                    "business_entities",
                    "result",
                ]
            },
        ),
        (_("Payload"), {"fields": ["fingerprint", "payload"]}),
        (
            _("Payload mismatch"),
            {"fields": ["mismatch_fingerprint", "mismatch_at", "mismatch_payload", "payload_diff"]},
        ),
        (_("Duplicates"), {"fields": ["duplicate_count", "last_duplicate_at"]}),
    ]
    actions = ["forget", "forget_and_redrive"]
    show_full_result_count = False

    @admin.display(description=_("event"))
    def event(self, obj: ProcessedEvent) -> str:
        return event_link(obj.event_id)

    #: Extra views under this admin, ``(site) -> [URLPattern]``: the face (idempotency.admin)
    #: sets the per-event page here, the inbox being where an operator starts.
    extra_urls: Any = None

    def get_urls(self) -> list[URLPattern]:
        extra = self.extra_urls(self.admin_site) if self.extra_urls is not None else []
        return [*extra, *super().get_urls()]

    def get_actions(self, request: HttpRequest) -> dict[str, Any]:
        actions = super().get_actions(request)
        if not app_settings.STORE_PAYLOADS:
            # Without stored payloads there is nothing to publish again: offering the action
            # would only ever refuse. Records stored while it was on can still be forgotten.
            actions.pop("forget_and_redrive", None)
        return actions

    @admin.display(boolean=True, description=_("mismatch"))
    def has_mismatch(self, obj: ProcessedEvent) -> bool:
        return obj.has_mismatch

    @admin.display(description=_("business entities"))
    def business_entities(self, obj: ProcessedEvent) -> str:
        links = []
        for row in rows_for_event(obj.event_id):
            meta = row._meta
            try:
                url = reverse(f"admin:{meta.app_label}_{meta.model_name}_change", args=[row.pk])
            except NoReverseMatch:
                url = ""
            links.append((url, f"{meta.verbose_name}: {row}"))
        if not links:
            return "-"
        return format_html_join(mark_safe("<br>"), '<a href="{}">{}</a>', links)

    @admin.display(description=_("payload diff"))
    def payload_diff(self, obj: ProcessedEvent) -> str:
        if not obj.has_mismatch:
            return "-"
        if obj.payload is None or obj.mismatch_payload is None:
            return gettext(
                "The payloads are not stored (IDEMPOTENCY['STORE_PAYLOADS'] was off when they "
                "arrived): compare the two fingerprints."
            )
        return payload_diff_html(obj.payload, obj.mismatch_payload)

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        response = super().changelist_view(request, extra_context)
        if isinstance(response, TemplateResponse) and response.context_data:
            changelist = response.context_data.get("cl")
            if changelist is not None:
                response.context_data["inbox_stats"] = inbox_stats(changelist.queryset)
        return response

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.action(
        description=_("Forget selected events (a redelivery will process them again)"),
        permissions=["delete"],
    )
    def forget(self, request: HttpRequest, queryset: QuerySet[ProcessedEvent]) -> None:
        self.log_deletions(request, queryset)
        count, _ = queryset.delete()
        self.message_user(
            request,
            ngettext("Forgot %d event.", "Forgot %d events.", count) % count,
            messages.SUCCESS,
        )

    @admin.action(
        description=_("Forget and re-drive selected events (publish the stored payload again)"),
        permissions=["delete"],
    )
    def forget_and_redrive(self, request: HttpRequest, queryset: QuerySet[ProcessedEvent]) -> None:
        """Forget each record and, once that committed, send its payload to its consumer's task.

        Only records whose payload is stored (STORE_PAYLOADS) and whose consumer names a
        registered Celery task qualify; the others are reported and left alone.
        """
        tasks = celery_tasks()
        drivable: list[tuple[ProcessedEvent, Any]] = []
        refused: list[str] = []
        for record in queryset:
            task = tasks.get(record.consumer)
            if record.payload is None:
                refused.append(gettext("%(record)s: no stored payload") % {"record": record})
            elif task is None:
                refused.append(
                    gettext("%(record)s: no Celery task named %(consumer)s")
                    % {"record": record, "consumer": record.consumer}
                )
            else:
                drivable.append((record, task))
        if refused:
            self.message_user(
                request,
                ngettext(
                    "%(count)d event cannot be re-driven and was left alone: %(why)s.",
                    "%(count)d events cannot be re-driven and were left alone: %(why)s.",
                    len(refused),
                )
                % {"count": len(refused), "why": "; ".join(refused)},
                messages.WARNING,
            )
        if drivable:
            using = router.db_for_write(ProcessedEvent) or DEFAULT_DB_ALIAS
            self._redrive(request, using, drivable)

    def _redrive(
        self, request: HttpRequest, using: str, drivable: list[tuple[ProcessedEvent, Any]]
    ) -> None:
        report = RedriveReport()
        user_id = request.user.pk
        assert user_id is not None  # the admin's actions need a logged-in user
        with transaction.atomic(using=using):
            for record, task in drivable:
                LogEntry.objects.log_actions(
                    user_id=user_id,
                    queryset=[record],
                    action_flag=DELETION,
                    change_message=(
                        f"Forgotten and re-driven: its stored payload was published again to "
                        f"the Celery task {task.name}."
                    ),
                    single_object=True,
                )
            pks = [record.pk for record, _task in drivable]
            ProcessedEvent.objects.using(using).filter(pk__in=pks).delete()
            for record, task in drivable:
                # After the commit: a worker must not find the record still there.
                transaction.on_commit(report.publisher(record, task), using=using)
        if transaction.get_connection(using).in_atomic_block:
            self.message_user(
                request,
                ngettext(
                    "Forgot %d event; its payload is published when the transaction commits.",
                    "Forgot %d events; their payloads are published when the transaction commits.",
                    len(drivable),
                )
                % len(drivable),
                messages.SUCCESS,
            )
            return
        self._report(request, report)

    def _report(self, request: HttpRequest, report: RedriveReport) -> None:
        if report.published:
            self.message_user(
                request,
                ngettext(
                    "Forgot and re-drove %d event.",
                    "Forgot and re-drove %d events.",
                    len(report.published),
                )
                % len(report.published),
                messages.SUCCESS,
            )
        if report.failed:
            self.message_user(
                request,
                gettext(
                    "Forgotten, but their payloads could not be published (see the error log, "
                    "which holds them): %s"
                )
                % ", ".join(report.failed),
                messages.ERROR,
            )


@dataclass
class RedriveReport:
    """What became of the payloads a re-drive published after its commit."""

    published: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    def publisher(self, record: ProcessedEvent, task: Any) -> Any:
        payload, name = record.payload, str(record)

        def publish() -> None:
            try:
                task.apply_async(args=[payload])
            except Exception:  # the broker's errors differ by transport; the payload is kept
                logger.exception(
                    "re-drive of %s could not publish to %s; payload: %s",
                    name,
                    task.name,
                    json.dumps(payload, cls=DjangoJSONEncoder),
                    extra={"consumer": record.consumer, "event_id": record.event_id},
                )
                self.failed.append(name)
            else:
                self.published.append(name)

        return publish


def celery_tasks() -> dict[str, Any]:
    """The registered Celery tasks by name; none without Celery (it is optional)."""
    try:
        from celery import current_app
    except ImportError:
        return {}
    return dict(current_app.tasks)


def pretty_json(value: Any) -> list[str]:
    text = json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, cls=DjangoJSONEncoder)
    return text.splitlines()


# The admin's own colours, so the diff follows its light and dark themes.
_REMOVED = "text-decoration: none; background: var(--message-error-bg)"
_ADDED = "text-decoration: none; background: var(--message-success-bg)"


def payload_diff_html(first: Any, mismatching: Any) -> SafeString:
    """A unified diff of two payloads as pretty-printed JSON, removed and added lines marked."""
    lines = difflib.unified_diff(
        pretty_json(first),
        pretty_json(mismatching),
        fromfile=gettext("first delivery"),
        tofile=gettext("mismatching delivery"),
        lineterm="",
    )
    styles = {"-": "idem-diff-removed", "+": "idem-diff-added", "@": "idem-diff-hunk"}
    html = []
    for line in lines:
        kind = styles.get(line[:1], "") if not line.startswith(("---", "+++")) else ""
        if kind == "idem-diff-removed":
            html.append(format_html('<del class="{}" style="{}">{}</del>', kind, _REMOVED, line))
        elif kind == "idem-diff-added":
            html.append(format_html('<ins class="{}" style="{}">{}</ins>', kind, _ADDED, line))
        else:
            html.append(format_html('<span class="{}">{}</span>', kind, line))
    return format_html(
        '<pre class="idem-diff" style="white-space: pre-wrap; margin: 0">{}</pre>',
        mark_safe("\n".join(html)),  # each line escaped above
    )


@dataclass
class DayCount:
    day: date
    count: int
    #: Bar height, percent of the busiest day.
    percent: int


def inbox_stats(queryset: QuerySet[ProcessedEvent]) -> dict[str, Any]:
    """Counts per consumer and outcome, and records per day, of the records listed."""
    records = queryset.order_by()
    per_consumer = list(
        records.values("consumer")
        .annotate(
            total=Count("pk"),
            processed=Count("pk", filter=Q(outcome=Outcome.PROCESSED)),
            rejected=Count("pk", filter=Q(outcome=Outcome.REJECTED)),
            mismatches=Count("pk", filter=~Q(mismatch_fingerprint="")),
            duplicates=Coalesce(Sum("duplicate_count"), 0),
        )
        .order_by("consumer")
    )
    columns = ("total", "processed", "rejected", "mismatches", "duplicates")
    totals = {column: sum(row[column] for row in per_consumer) for column in columns}
    return {
        "per_consumer": per_consumer,
        "totals": totals,
        "per_day": per_day(records),
        "days": CHART_DAYS,
        "record_duplicates": bool(app_settings.RECORD_DUPLICATES),
    }


def per_day(records: QuerySet[ProcessedEvent]) -> list[DayCount]:
    today = timezone.localdate()
    first = today - timedelta(days=CHART_DAYS - 1)
    since = timezone.make_aware(datetime.combine(first, time.min))
    counts = dict(
        records.filter(processed_at__gte=since)
        .annotate(day=TruncDate("processed_at"))
        .values("day")
        .annotate(n=Count("pk"))
        .values_list("day", "n")
    )
    busiest = max(counts.values(), default=0)
    days = [first + timedelta(days=n) for n in range(CHART_DAYS)]
    return [
        DayCount(day, counts.get(day, 0), _percent(counts.get(day, 0), busiest)) for day in days
    ]


def _percent(count: int, busiest: int) -> int:
    return round(100 * count / busiest) if busiest else 0
