"""The two tasks the end-to-end benchmark runs through a real worker (``--include bench.tasks``),
and what each worker process reports about itself.

Both tasks apply the same business transaction; only the guard differs.

With ``BENCH_WORKER_DIR`` set, each worker process (the main one and each pool child) writes
there, as it shuts down, the settings it ran with (:func:`bench.runtime.describe`) and the
number of tasks it ran; with ``BENCH_PROFILE=1`` also its cProfile (``<role>-<pid>.prof``),
from when it became ready to when it shut down, which bench/workerprofile.py reads.
"""

from __future__ import annotations

import cProfile
import json
import os
from pathlib import Path
from typing import Any

from celery import shared_task, signals
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


_profile: cProfile.Profile | None = None
_tasks = 0


def _start(**kwargs: Any) -> None:
    global _profile
    if os.environ.get("BENCH_WORKER_DIR") and os.environ.get("BENCH_PROFILE") == "1":
        _profile = cProfile.Profile()
        _profile.enable()


def _count(**kwargs: Any) -> None:
    global _tasks
    _tasks += 1


def _stop(role: str) -> None:
    directory = os.environ.get("BENCH_WORKER_DIR")
    if not directory:
        return
    if _profile is not None:
        _profile.disable()
    from bench import runtime

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    name = f"{role}-{os.getpid()}"
    if _profile is not None:
        _profile.dump_stats(out / f"{name}.prof")
    described = runtime.describe()
    described["worker"] = _worker_settings()
    (out / f"{name}.json").write_text(
        json.dumps({"role": role, "tasks": _tasks, "settings": described}, default=str)
    )


def _worker_settings() -> str:
    from django.conf import settings

    return (
        f"prefork, prefetch multiplier {settings.CELERY_WORKER_PREFETCH_MULTIPLIER}, "
        f"acks_late {settings.CELERY_TASK_ACKS_LATE}, "
        f"CELERY_DB_REUSE_MAX {settings.CELERY_DB_REUSE_MAX}"
    )


# A pool child: from its start (after the fork) to its exit. The main process: from when the
# worker is ready (its children forked, so they do not inherit its profiler) to its shutdown.
signals.worker_process_init.connect(_start, weak=False)
signals.worker_process_shutdown.connect(lambda **kw: _stop("child"), weak=False)
signals.worker_ready.connect(_start, weak=False)
signals.worker_shutdown.connect(lambda **kw: _stop("main"), weak=False)
signals.task_postrun.connect(_count, weak=False)
