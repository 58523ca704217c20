"""Celery consumers of the order events: each applies an event's effect exactly once."""

from __future__ import annotations

from typing import Any

from idempotency.celery import idempotent_task

from . import services


@idempotent_task
def place_order(event: dict[str, Any]) -> dict[str, Any]:
    return services.place_order(event)
