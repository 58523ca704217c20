"""System checks, namespaced ``idempotency.E00x`` / ``idempotency.W00x``. Ids are never reused."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.core.checks import CheckMessage, Error, Warning, register

from .conf import DEFAULTS, MISMATCH_POLICIES, app_settings
from .exceptions import IdempotencyConfigurationError


@register("idempotency")
def check_settings(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    try:
        app_settings.reload()
        app_settings.RETENTION  # noqa: B018 (loads and validates the dict)
    except IdempotencyConfigurationError as exc:
        return [
            Error(
                str(exc),
                hint=f"Accepted keys: {', '.join(sorted(DEFAULTS))}.",
                id="idempotency.E001",
            )
        ]
    messages: list[CheckMessage] = []
    retentions = {"RETENTION": app_settings.RETENTION}
    overrides = app_settings.CONSUMER_RETENTION
    if not isinstance(overrides, dict):
        messages.append(
            Error("IDEMPOTENCY['CONSUMER_RETENTION'] must be a dict", id="idempotency.E002")
        )
    else:
        retentions.update(
            {f"CONSUMER_RETENTION[{name!r}]": value for name, value in overrides.items()}
        )
    for label, value in retentions.items():
        if value is None:
            messages.append(
                Warning(
                    f"IDEMPOTENCY[{label}] is None: processed events are kept forever and the "
                    "table grows without bound.",
                    hint="Set a timedelta longer than the longest redelivery window.",
                    id="idempotency.W002",
                )
            )
        elif not isinstance(value, timedelta) or value <= timedelta(0):
            messages.append(
                Error(
                    f"IDEMPOTENCY[{label}] must be a positive timedelta, not {value!r}",
                    id="idempotency.E003",
                )
            )
    if app_settings.ON_MISMATCH not in MISMATCH_POLICIES:
        messages.append(
            Error(
                f"IDEMPOTENCY['ON_MISMATCH'] must be one of {', '.join(MISMATCH_POLICIES)}, "
                f"not {app_settings.ON_MISMATCH!r}",
                id="idempotency.E004",
            )
        )
    return messages
