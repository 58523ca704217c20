"""Where a task's time goes in a Celery worker, from the cProfiles bench/tasks.py writes.

A prefork worker with one pool process runs each task in the pool child, while its main process
talks to the broker: it receives a message, hands it to the child over a pipe, and acknowledges
it once the child reports it done (``acks_late``), after which the broker delivers the next
(prefetch 1). So the time per task is the child's work on it plus that hand-off; the rows split
both. Times are per task, in milliseconds of the profiled run; cProfile slows Python code down
(often twofold), so compare the rows of one run rather than the absolute figures.
"""

from __future__ import annotations

import json
import pstats
from pathlib import Path
from typing import Any

#: (path suffix, function name) of the functions whose cumulative time the rows use.
PLACE = ("bench/workload.py", "place")
COMMIT = ("django/db/backends/base/base.py", "commit")
TASK = ("celery/app/trace.py", "__protected_call__")
TRACE = ("celery/app/trace.py", "fast_trace_task")
TRACE_INNER = ("celery/app/trace.py", "trace_task")
LOOP = ("billiard/pool.py", "workloop")
CONNECTIONS = (
    ("celery/fixups/django.py", "on_task_prerun"),
    ("celery/fixups/django.py", "on_task_postrun"),
    ("project/celery.py", "close_broken_connections"),
)
#: Built-ins in which a process waits rather than works.
IDLE = ("{built-in method posix.read}", "{method 'poll' of 'select.epoll' objects}")
SHUTDOWN = ("{built-in method posix.waitpid}",)
BROKER_PACKAGES = ("/kombu/", "/amqp/", "/redis/", "/vine/", "/botocore/", "/urllib3/")
SOCKET = ("_socket.socket", "_ssl.")
CELERY_PACKAGES = ("/celery/", "/billiard/")

#: The rows of the table: key, label.
ROWS = (
    ("wall", "time per task (1 / rate)"),
    ("place", "pool child: the business statements (bench/workload.py place)"),
    ("commit", "pool child: COMMIT"),
    ("guard", "pool child: the guard (claim, checks) / the unguarded task's own atomic()"),
    ("statement", "  of which the claim's statement (its round trip included)"),
    ("connections", "pool child: Django connection handling (task_prerun/postrun)"),
    ("tracing", "pool child: Celery tracing around the task"),
    ("pool", "pool child: billiard's loop (the task in, the result out)"),
    ("handoff", "hand-off: the rest of the wall time (main process, broker, pipe)"),
    ("broker_io", "main process, over the run: kombu/amqp/redis and socket I/O (own time)"),
    ("consumer", "main process, over the run: Celery's consumer and pool (own time)"),
)


def _label(func: tuple[str, int, str]) -> str:
    return pstats.func_std_string(func)


class Profile:
    def __init__(self, path: Path) -> None:
        stats = pstats.Stats(str(path))
        self.entries: dict[tuple[str, int, str], tuple[Any, ...]] = stats.stats  # type: ignore[attr-defined]

    def cumulative(self, suffix: str, name: str) -> float:
        return sum(
            entry[3]
            for (file, _, func), entry in self.entries.items()
            if func == name and file.endswith(suffix)
        )

    def own(self, match: Any) -> float:
        return sum(entry[2] for func, entry in self.entries.items() if match(func))


#: The claim statements of idempotency/inbox/statements.py. One of them is called per claim,
#: and may call another (the adaptive one calls insert_select or insert_returning), so the
#: outermost, the one with the most cumulative time, holds the claim's whole cost.
STATEMENTS = (
    "insert_select_when_duplicate",
    "insert_select",
    "insert_returning",
    "insert_on_duplicate",
    "get_or_create",
)
#: Functions of the guard listed under the table (by cumulative time per task).
GUARD_PACKAGE = "/idempotency/"
TOP = 10


def analyse(directory: Path) -> dict[str, Any]:
    """Seconds per part over the run, and the tasks the child ran, from one worker's files."""
    children = sorted(directory.glob("child-*.prof"))
    mains = sorted(directory.glob("main-*.prof"))
    if len(children) != 1 or len(mains) != 1:
        raise RuntimeError(f"expected one pool child and one main process in {directory}")
    child, main = Profile(children[0]), Profile(mains[0])
    tasks = json.loads(children[0].with_suffix(".json").read_text())["tasks"]
    place, commit = child.cumulative(*PLACE), child.cumulative(*COMMIT)
    task, trace = child.cumulative(*TASK), child.cumulative(*TRACE)
    connections = sum(child.cumulative(*c) for c in CONNECTIONS)
    idle_child = child.own(lambda f: _label(f) in IDLE)
    # Own and cumulative seconds: the guard's own Python is small; most of its time is spent in
    # what it calls (Django's cursor, psycopg's round trip, the commit).
    guard_functions = {
        f"{Path(file).parent.name}/{Path(file).name}:{line} {name}": [entry[2], entry[3]]
        for (file, line, name), entry in child.entries.items()
        if GUARD_PACKAGE in file
    }
    return {
        "tasks": tasks,
        "guard_functions": guard_functions,
        "seconds": {
            "place": place,
            "commit": commit,
            "guard": task - place - commit,
            "statement": max(
                child.cumulative("idempotency/inbox/statements.py", n) for n in STATEMENTS
            ),
            "connections": connections,
            "tracing": trace - task - connections,
            "pool": child.cumulative(*LOOP) - trace - idle_child,
            "broker_io": main.own(
                lambda f: (
                    _label(f) not in IDLE
                    and (any(p in f[0] for p in BROKER_PACKAGES) or any(s in f[2] for s in SOCKET))
                )
            ),
            "consumer": main.own(
                lambda f: (
                    _label(f) not in IDLE + SHUTDOWN and any(p in f[0] for p in CELERY_PACKAGES)
                )
            ),
        },
    }


def merge(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Several profiled runs of one task as one: seconds and tasks summed, the mean rate."""
    merged: dict[str, Any] = {"tasks": 0, "seconds": {}, "guard_functions": {}, "wall": 0.0}
    for run in runs:
        merged["tasks"] += run["tasks"]
        merged["wall"] += run["tasks"] / run["rate"]
        for part in ("seconds", "guard_functions"):
            for key, value in run[part].items():
                if isinstance(value, list):
                    before = merged[part].get(key, [0.0] * len(value))
                    merged[part][key] = [a + b for a, b in zip(before, value, strict=True)]
                else:
                    merged[part][key] = merged[part].get(key, 0.0) + value
    merged["rate"] = merged["tasks"] / merged["wall"]
    merged["runs"] = len(runs)
    return merged


def per_task(run: dict[str, Any]) -> dict[str, float]:
    """Milliseconds per task for each row."""
    ms = {key: 1000 * value / run["tasks"] for key, value in run["seconds"].items()}
    ms["wall"] = 1000 / run["rate"]
    ms.setdefault("statement", 0.0)
    child = sum(ms[k] for k in ("place", "commit", "guard", "connections", "tracing", "pool"))
    ms["handoff"] = ms["wall"] - child
    return ms


def table(runs: dict[str, Any]) -> list[str]:
    """The markdown table of the rows, for the unguarded and the guarded task."""
    unguarded, guarded = per_task(runs["unguarded"]), per_task(runs["guarded"])
    lines = [
        "| where (ms per task) | unguarded | guarded | guarded - unguarded |",
        "|---|---:|---:|---:|",
    ]
    for key, label in ROWS:
        a, b = unguarded[key], guarded[key]
        lines.append(f"| {label} | {a:.2f} | {b:.2f} | {b - a:+.2f} |")
    own = ("connections", "tracing", "pool", "handoff")
    worker = {kind: sum(ms[k] for k in own) for kind, ms in (("u", unguarded), ("g", guarded))}
    work = {
        kind: sum(ms[k] for k in ("place", "commit", "guard"))
        for kind, ms in (("u", unguarded), ("g", guarded))
    }
    lines += [
        "",
        f"Per task, the guard takes {guarded['guard']:.2f} ms ({guarded['statement']:.2f} ms "
        f"of it the claim's statement) where the unguarded task's own atomic() takes "
        f"{unguarded['guard']:.2f} ms ({guarded['guard'] - unguarded['guard']:+.2f} ms); the "
        "transaction's own "
        f"rows (statements, COMMIT, guard or atomic) total {work['u']:.2f} ms unguarded and "
        f"{work['g']:.2f} ms guarded; the worker's own cost around a task (connection "
        f"handling, tracing, billiard, hand-off) is {worker['u']:.2f} and {worker['g']:.2f} ms. "
        "The other rows are the same work in both tasks: their differences are the run's "
        "noise, which a ratio of the rates carries too.",
    ]
    functions = guarded_top(runs["guarded"])
    if functions:
        lines += [
            "",
            "The guarded task's functions of idempotency/ with the most cumulative time (what "
            "they call included; the outer ones contain the business transaction):",
            "",
            "| function | cumulative ms per task | own ms per task |",
            "|---|---:|---:|",
            *(f"| `{name}` | {cum:.3f} | {own:.3f} |" for name, own, cum in functions),
        ]
    return lines


def guarded_top(run: dict[str, Any]) -> list[tuple[str, float, float]]:
    tasks = run["tasks"]
    rows = [
        (name, 1000 * own / tasks, 1000 * cum / tasks)
        for name, (own, cum) in run.get("guard_functions", {}).items()
    ]
    return sorted(rows, key=lambda row: -row[2])[:TOP]
