"""The outbox reconciler's system checks: E010, W006, W007.

Registered by :mod:`idempotency.checks`, which hands them the waits Celery sets.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import timedelta

from django.core.checks import CheckMessage, Error, Warning

from ..conf import app_settings
from ..exceptions import IdempotencyConfigurationError
from ..inbox.checks import Horizon, human_duration


def reconciler_settings(waits: Callable[[], Sequence[Horizon]]) -> list[CheckMessage]:
    """The reconciler's horizon against what may legitimately delay an outcome, and its whole
    window against how far back it may look (the retention) and the declared horizon.

    *waits* gives what may delay an outcome: the broker's visibility timeout and each
    idempotent task's retry span; it is called only once the reconciler's settings are valid.
    """
    from .reconciling import span

    try:
        after = app_settings.RECONCILE_AFTER
        republishes = app_settings.RECONCILE_REPUBLISHES
        retention = app_settings.RETENTION
        overrides = app_settings.CONSUMER_RETENTION
        declared = app_settings.REDELIVERY_HORIZON
    except IdempotencyConfigurationError:
        return []  # reported as E001
    messages: list[CheckMessage] = []
    if after is not None and (not isinstance(after, timedelta) or after <= timedelta(0)):
        messages.append(
            Error(
                f"IDEMPOTENCY['RECONCILE_AFTER'] must be a positive timedelta or None, "
                f"not {after!r}",
                id="idempotency.E010",
            )
        )
    if isinstance(republishes, bool) or not isinstance(republishes, int) or republishes < 0:
        messages.append(
            Error(
                f"IDEMPOTENCY['RECONCILE_REPUBLISHES'] must be an integer of 0 or more, "
                f"not {republishes!r}",
                id="idempotency.E010",
            )
        )
    if messages or after is None:
        return messages
    found = waits()
    if found:
        longest = max(found, key=lambda h: h.delay)
        if after < longest.delay:
            messages.append(
                Warning(
                    f"IDEMPOTENCY['RECONCILE_AFTER'] ({human_duration(after)}) is shorter than "
                    f"{longest.source}: the outbox reconciler republishes messages that the "
                    "broker still holds or whose task is still retrying. Each is a duplicate "
                    "the inbox discards, but a retrying event then runs its retries twice, and "
                    "one still retrying after every republish is marked failed.",
                    hint="Raise RECONCILE_AFTER above the broker's visibility timeout and the "
                    "tasks' retry spans.",
                    id="idempotency.W006",
                )
            )
    window = span(after, republishes)
    limits = [("RETENTION", retention)]
    if isinstance(overrides, dict):
        limits += [(f"CONSUMER_RETENTION[{name!r}]", value) for name, value in overrides.items()]
    for label, value in limits:
        if isinstance(value, timedelta) and value > timedelta(0) and window + after > value:
            messages.append(
                Warning(
                    f"the outbox reconciler's last check comes {human_duration(window)} after "
                    f"a message's publish (RECONCILE_AFTER {human_duration(after)}, "
                    f"RECONCILE_REPUBLISHES {republishes}), past what IDEMPOTENCY[{label}] "
                    f"({human_duration(value)}) lets it look back: it never looks at a message "
                    "older than the retention less RECONCILE_AFTER (its inbox record may be "
                    "purged), so one that never gets an outcome is closed unchecked instead of "
                    "marked failed.",
                    hint="Shorten RECONCILE_AFTER or RECONCILE_REPUBLISHES, or keep records "
                    "longer.",
                    id="idempotency.W007",
                )
            )
    last_republish = span(after, republishes - 1) if republishes else None
    if isinstance(declared, timedelta) and last_republish and last_republish > declared:
        messages.append(
            Warning(
                "the outbox reconciler republishes a message up to "
                f"{human_duration(last_republish)} after its first publish, later than "
                f"IDEMPOTENCY['REDELIVERY_HORIZON'] ({human_duration(declared)}) says any "
                "producer publishes an event again.",
                hint="Raise REDELIVERY_HORIZON to cover it (and keep the retention above it), "
                "or shorten RECONCILE_AFTER or RECONCILE_REPUBLISHES.",
                id="idempotency.W007",
            )
        )
    return messages
