from __future__ import annotations

from typing import Any

from celery import Task


def deliver(task: Task, event: dict[str, Any]) -> Any:
    """Run a task's body as a worker would (in-process, no broker); re-raise its exception."""
    return task.apply(args=[event], throw=True).get()
