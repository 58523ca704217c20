"""The two tasks the end-to-end benchmark runs through a real worker (``--include bench.tasks``).

Both apply the same business transaction; only the guard differs.
"""

from __future__ import annotations

from typing import Any

from celery import shared_task
from django.db import transaction

from bench.workload import place
from idempotency.celery import idempotent_task


@shared_task(name="bench.unguarded", acks_late=True, ignore_result=True)
def unguarded(event: dict[str, Any]) -> None:
    with transaction.atomic():
        place(event["products"], event["customer"], event["eventId"])


@idempotent_task(name="bench.guarded", ignore_result=True)
def guarded(event: dict[str, Any]) -> None:
    place(event["products"], event["customer"], event["eventId"])
