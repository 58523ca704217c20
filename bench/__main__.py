"""``make bench``: every benchmark in one run on PostgreSQL, written to docs/benchmarks.md.

    python -m bench            # the full run: docs/benchmarks.md and .png
    python -m bench --quick    # a smoke run (three or four minutes), written under var/bench/

DATABASE_URL names the benchmark database (default postgres://postgres@127.0.0.1:5432/
idempotency_bench); it is dropped and created afresh, so its name must end in ``_bench``.
BENCH_AMQP_URL and BENCH_REDIS_URL name the brokers (bench/celery_e2e.py).

Every module runs on bench/settings.py: DEBUG off and the library's defaults, unless
``--debug`` or ``--idempotency KEY=JSON`` say otherwise (bench/runtime.py). The report's header
shows the settings each measuring process read back from itself.

The report is a list of :class:`Section`: each runs one module (``python -m bench.<name>``)
and renders its part; a new benchmark adds a ``Section`` to :data:`SECTIONS`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench import runtime
from bench.database import bench_url, recreate

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {
    "ours": 0.95,
    "duplicate": 6.0,
    "guarded_vs_unguarded": 0.9,
    "guarded_vs_direct": 0.8,
}


@dataclass
class Result:
    """What a section's module produced: its stdout, and its ``--json`` file (or None)."""

    stdout: str
    data: Any = None


@dataclass
class Section:
    """One module's part of the report, run as ``python -m <module> [--quick] [--json F]``."""

    key: str
    title: str
    module: str
    #: Arguments besides --quick and --json.
    args: list[str] = field(default_factory=list)
    #: Whether the module writes ``--json``.
    json: bool = True
    #: Whether a smoke run (--quick) runs it too.
    quick: bool = True
    #: The section's lines (its title excluded); by default the module's stdout.
    render: Callable[[Result], list[str]] = lambda result: [result.stdout.strip()]


def run(module: str, args: list[str], env: dict[str, str]) -> str:
    """Run a benchmark module, its progress on the terminal; its table (stdout) returned."""
    print(f"\n=== {module} {' '.join(args)}", file=sys.stderr, flush=True)
    done = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        check=False,
    )
    if done.returncode:
        sys.exit(f"{module} failed with exit code {done.returncode}")
    return done.stdout


def versions(env: dict[str, str]) -> dict[str, str]:
    amqp_url = env.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
    redis_url = env.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/13")
    code = (
        "import django, celery, kombu, psycopg, redis, json;"
        "from django.db import connection;"
        "from kombu import Connection;"
        "c = connection.cursor(); c.execute('show server_version');"
        "pg = c.fetchone()[0];"
        f"amqp = Connection({amqp_url!r}); amqp.connect();"
        "rabbit = amqp.connection.server_properties.get('version', '?'); amqp.release();"
        f"r = redis.Redis.from_url({redis_url!r}).info()['redis_version'];"
        "from importlib.metadata import version;"
        "print(json.dumps({'Django': django.get_version(), 'Celery': celery.__version__,"
        "'moto (the SQS emulator)': version('moto'),"
        "'kombu': kombu.__version__, 'psycopg': psycopg.__version__, 'PostgreSQL': pg,"
        "'RabbitMQ': rabbit, 'Redis': r}))"
    )
    out = subprocess.run(
        [sys.executable, "manage.py", "shell", "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {"Python": platform.python_version(), **json.loads(out.strip().splitlines()[-1])}


def machine() -> str:
    memory = int(Path("/proc/meminfo").read_text().split()[1]) // 1024 // 1024
    return (
        f"{os.cpu_count()} cores ({runtime.cpu_model()}), {memory} GiB, "
        f"{platform.system()} {platform.release()}"
    )


def pair_ratios(claim: dict[str, Any], label: str, processes: int) -> list[float]:
    return next(r for name, p, r in claim["pairs"] if name == label and p == processes)


def e2e_ratios(e2e: dict[str, Any], broker: str, processes: int) -> list[float] | None:
    return next((r for b, p, r in e2e["pairs"] if b == broker and p == processes), None)


def median_rate(rows: list[list[Any]], *key: Any) -> float:
    return statistics.median(next(row[-1] for row in rows if tuple(row[:-1]) == key))


def measured_with(claim: dict[str, Any], e2e: dict[str, Any]) -> list[str]:
    """The settings that matter, as each measuring process read them back from itself."""
    columns = {"bench.claim (its parent process)": claim["settings"]}
    for role, described in sorted(e2e.get("settings", {}).items()):
        columns[f"Celery worker, {'a pool child' if role == 'child' else 'main process'}"] = (
            described
        )
    keys = list(dict.fromkeys(k for described in columns.values() for k in described))
    lines = [f"| setting | {' | '.join(columns)} |", "|---|" + "---|" * len(columns)]
    for key in keys:
        values = " | ".join(str(described.get(key, "")) for described in columns.values())
        lines.append(f"| {key} | {values} |")
    overrides = claim.get("overrides") or {}
    for name, settings in overrides.items():
        lines.append("")
        lines.append(f'The row "{name}" runs with {json.dumps(settings)} in its own processes.')
    return lines


def summary(claim: dict[str, Any], e2e: dict[str, Any]) -> list[str]:
    """The targets, each with the median (and min-max) of the ratios measured in this run."""
    lines = ["| target | median | min-max | met |", "|---|---:|---:|:---:|"]

    def add(what: str, values: list[float], target: float | None) -> None:
        value = statistics.median(values)
        met = "-" if target is None else ("yes" if value >= target else "no")
        goal = "" if target is None else f" >= {target:g}x"
        lines.append(
            f"| {what}{goal} | {value:.2f}x | {min(values):.2f}-{max(values):.2f}x | {met} |"
        )

    for p in (1, 2):
        add(f"ours first-time / bare, {p} process(es)", pair_ratios(claim, "ours / bare", p),
            TARGETS["ours"])  # fmt: skip
        add(f"(the floor: raw INSERT / bare, {p} process(es))",
            pair_ratios(claim, "floor / bare", p), None)  # fmt: skip
        add(f"(ours / the floor, {p} process(es))", pair_ratios(claim, "ours / floor", p), None)
        add(f"duplicate discard / first-time, {p} process(es)",
            pair_ratios(claim, "duplicate / first-time", p), TARGETS["duplicate"])  # fmt: skip
    for broker in ("rabbitmq", "redis", "embedded", "sqs"):
        for p in (1, 2):
            ratios = e2e_ratios(e2e, broker, p)
            if ratios is None:
                continue
            # The targets are set for RabbitMQ and Redis; the others are shown for reference.
            target = TARGETS["guarded_vs_unguarded"] if broker in ("rabbitmq", "redis") else None
            add(f"{broker}: guarded / unguarded task, {p} process(es)", ratios, target)
            if broker not in ("rabbitmq", "redis"):
                continue
            # Rates of different runs: the claim's and the worker's are not measured in pairs.
            guarded = median_rate(e2e["rates"], broker, "guarded", p)
            direct = median_rate(claim["rates"], "ours", p)
            add(
                f"{broker}: guarded task / the same transaction run directly, {p} process(es)",
                [guarded / direct],
                TARGETS["guarded_vs_direct"],
            )
    return lines


def e2e_table(e2e: dict[str, Any]) -> list[str]:
    lines = [
        "| broker | processes | task | tasks/s median | min-max | guarded / unguarded: "
        "median of the pairs | min-max |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for broker, kind, p, r in e2e["rates"]:
        ratio = spread = ""
        if kind == "guarded":
            pairs = e2e_ratios(e2e, broker, p) or []
            ratio = f"{statistics.median(pairs):.2f}x"
            spread = f"{min(pairs):.2f}-{max(pairs):.2f}"
        lines.append(
            f"| {broker} | {p} | {kind} | {statistics.median(r):,.0f} | "
            f"{min(r):,.0f}-{max(r):,.0f} | {ratio} | {spread} |"
        )
    return lines


def e2e_section(result: Result) -> list[str]:
    from bench import workerprofile

    e2e = result.data
    sqs_one = e2e.get("sqs_one_process_tasks", e2e["tasks"])
    lines = [
        "The same business transaction as a Celery task through a real `celery worker` "
        "(prefork, 1 and 2 pool processes, the example's settings: `acks_late`, prefetch 1, "
        "connections reused): `unguarded` is a plain `@shared_task` in `transaction.atomic()`, "
        "`guarded` is `@idempotent_task` (bench/tasks.py). The queue is filled first, then a "
        "worker drains it; the rate runs from the first order's timestamp to the last, so the "
        f"worker's start-up does not count. {e2e['tasks']} tasks per run (the embedded broker "
        f"fewer, and SQS with one pool process {sqs_one}: it drains one or two a second); the "
        "guarded and the unguarded task run in pairs, one right after the other in alternating "
        "order, and each ratio is taken within its pair.",
        "",
        *e2e_table(e2e),
        "",
        "The `embedded` rows are the example's embedded default broker (kombu's filesystem "
        "transport with the example's prompt acknowledgement, project/embedded_broker.py) in "
        "front of the same PostgreSQL; the `sqs` rows run through moto's SQS emulator on the "
        "same machine (or `BENCH_SQS_URL`): they measure the example's SQS path with the "
        "emulator's speed, not Amazon SQS's. The rate of one pool process is not the "
        "emulator's doing: with prefetch 1, kombu's asynchronous SQS channel checks for a free "
        "slot once per pass of the worker's event loop, the acknowledgement frees it after "
        "that pass's check, and nothing wakes the next pass (an idle pool, and SQS requests "
        "are plain HTTP with no socket to watch) until a timer, kombu's HTTP client ticking "
        "once a second: about one message a second, and Amazon SQS goes through the same loop "
        "(not measured there). Long polling plays no "
        "part (`wait_time_seconds` 0 drains at the same rate). With 2 pool processes a slot is "
        "free while the other runs, and its results wake the loop: run SQS workers with 2 or "
        "more (docs/celery.md, Amazon SQS).",
    ]
    for broker, runs in e2e.get("profiles", {}).items():
        rates = ", ".join(f"{kind} {run['rate']:,.0f} tasks/s" for kind, run in runs.items())
        count = runs["guarded"].get("runs", 1)
        lines += [
            "",
            f"### Where a task's time goes: {broker}, one pool process, under cProfile",
            "",
            f"{count} run(s) of each task (alternating, their profiles summed) with cProfile in "
            f"the pool child and the worker's main process ({rates}; cProfile slows Python "
            "code down, so compare the rows, not the rates). The guard's row is what the "
            "guarded task adds; the rows around it are the worker's own per-task cost, which "
            "the guard does not change.",
            "",
            *workerprofile.table(runs),
        ]
    if e2e.get("profiles"):
        lines += ["", PROFILE_TEXT]
    return lines


CLAIM_TEXT = """\
Every approach runs the same business transaction, the writes of a PlaceOrder (an order, two
items, two stock updates: bench/workload.py), for fresh events in one and in two processes, each
process with its own products so that they do not queue on row locks:

* **bare**: the transaction alone, no guard: what the others are compared with.
* **ours**: `idempotency.inbox.idempotent(consumer, event_id)` around it, the library's defaults.
* **floor**: the inbox's one statement written by hand, `INSERT INTO idempotency_processedevent
  (...) VALUES (...) ON CONFLICT DO NOTHING RETURNING id`, its columns and values built once from
  the model's fields and defaults, in the same transaction: what no library can beat. `ours /
  floor` is the library's own overhead on top of its statement.
* **naive get_or_create**: `ProcessedEvent.objects.get_or_create(...)` in the transaction (a
  SELECT, then an INSERT in a savepoint).
* **inbox in an earlier transaction**: the record committed first, the change after: faster to
  write, but a crash between the two commits loses the event.
* **redis lock (celery-once style)**: `SET NX EX` in Redis before the transaction; nothing ties
  the lock to the commit.
* **ours, duplicate discarded**: the same claim for events already recorded: the guard finds
  the record and the transaction does nothing else; with the default `RECORD_DUPLICATES` off it
  writes nothing. The row with `RECORD_DUPLICATES` on counts each duplicate on its record (an
  UPDATE, and a WAL flush at commit), as the example project does.

The approaches run interleaved: each round runs each of them once (a few hundred events per
process), in alternating order (bare, ours, floor, ..., then ..., floor, ours, bare), so ours and
bare are always measured one right after the other. A ratio is taken within each round, and the
tables give the median and the range of those per-round ratios, which drift on a shared machine
moves far less than it moves any single pair.
"""


PROFILE_TEXT = """\
How to read the profiles: with one pool process and prefetch 1, a task's wall time is the pool
child's work on it plus the hand-off: the child reports the task done, the main process
acknowledges the message (`acks_late`), the broker delivers the next one, and the main process
passes it to the child over a pipe. The child's rows split its work: the business statements,
the COMMIT, the guard (for the unguarded task, its own `transaction.atomic()`), Django's
connection handling around each task, Celery's tracing, and billiard's loop. The last two rows
are the main process's own time over the whole run (start-up and shutdown included), divided by
the tasks: mostly broker I/O, which the child's work does not wait for except at the hand-off.
"""


def embedded_section(result: Result) -> list[str]:
    run = result.data
    return [
        "The example service as `make run` starts it (scripts/run.sh: SQLite, the embedded "
        "broker, a worker, the relay, the web server; the example's settings, so "
        "`RECORD_DUPLICATES` on, which this measure needs to count the duplicates discarded), "
        f"{run['events']} PlaceOrder events and {run['duplicates']} duplicates posted through "
        f"the API by {run['clients']} clients at once (bench/embedded.py). Applied: every "
        "event once and every duplicate discarded, counted from the first POST.",
        "",
        "| transport | polling interval | deliveries | posted/s | applied/s | "
        "last applied after the last POST |",
        "|---|---:|---:|---:|---:|---:|",
        f"| `{run['transport']}` | {run['polling_interval']} s | "
        f"{run['events'] + run['duplicates']} | {run['posted_per_second']:.1f} | "
        f"{run['applied_per_second']:.1f} | {run['lag_seconds']:.1f} s |",
    ]


def claim_section(result: Result) -> list[str]:
    return [CLAIM_TEXT, result.stdout.strip()]


SECTIONS: list[Section] = [
    Section(
        "claim", "The claim against a bare transaction, the floor and the alternatives",
        "bench.claim", render=claim_section,
    ),
    # The claim alone, each path with each choice of statement (about two minutes).
    Section(
        "statements", "The claim's statement, path by path", "bench.statements", json=False,
    ),
    Section(
        "e2e", "Celery end to end", "bench.celery_e2e",
        args=["--profile", "rabbitmq", "--profile", "redis"], render=e2e_section,
    ),
    # The service's start-up takes most of a minute: a smoke run leaves it out (the Celery
    # section still runs the embedded broker).
    Section(
        "embedded", "The embedded default, end to end", "bench.embedded",
        render=embedded_section, quick=False,
    ),
    # The reference strategies (one DELETE, pk IN (...)) are for `make bench-purge`: they would
    # take this run past its time.
    Section("purge", "Purge", "bench.purge", args=["--no-reference"], json=False),
    # Target 4: the inbox grown in place to 10M records (quick: 100k).
    Section("scale", "Flat cost as the inbox grows", "bench.scale"),
    # Target 5; {out} is the report's directory, where the plot goes.
    Section(
        "steady", "Steady state: claims under the scheduled purge", "bench.steady",
        args=["--plot", "{out}/steady.png"],
        render=lambda result: [result.stdout.strip(), "", "![steady state](steady.png)"],
    ),
]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run, written under var/bench/"
    )
    runtime.add_arguments(parser)
    args = parser.parse_args()
    # --debug and --idempotency become environment variables every module inherits.
    runtime.export(sys.argv[1:])
    quick = ["--quick"] if args.quick else []
    out_dir = ROOT / ("var/bench" if args.quick else "docs")
    out_dir.mkdir(parents=True, exist_ok=True)
    scratch = ROOT / "var" / "bench"
    scratch.mkdir(parents=True, exist_ok=True)
    url = bench_url()
    env = {
        **os.environ,
        "DATABASE_URL": url,
        "DJANGO_SETTINGS_MODULE": runtime.SETTINGS_MODULE,
        "IDEMPOTENCY_LOG_LEVEL": "WARNING",
    }
    started = time.monotonic()
    recreate(url)
    subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=ROOT, env=env, check=True)
    results: dict[str, Result] = {}
    timings: dict[str, float] = {}
    sections = [section for section in SECTIONS if section.quick or not args.quick]
    for section in sections:
        path = scratch / f"{section.key}.json"
        extra = ["--json", str(path)] if section.json else []
        begun = time.monotonic()
        arguments = [a.replace("{out}", str(out_dir)) for a in section.args]
        stdout = run(section.module, [*quick, *arguments, *extra], env)
        timings[section.key] = time.monotonic() - begun
        data = json.loads(path.read_text()) if section.json else None
        results[section.key] = Result(stdout, data)
    elapsed = time.monotonic() - started
    claim, e2e = results["claim"].data, results["e2e"].data

    report = [
        "# Benchmarks",
        "",
        f"Generated by `make bench{' ARGS=--quick' if args.quick else ''}` on "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC in {elapsed / 60:.1f} minutes ("
        + ", ".join(f"{key} {seconds / 60:.1f}" for key, seconds in timings.items())
        + ").",
        f"Machine: {machine()}.",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in versions(env).items()) + ".",
        "Each rate is the median (and range) over the rounds; each ratio is taken between two "
        "approaches measured one right after the other, and reported as the median (and range) "
        "of those pairs. The machine is shared, so compare the ratios rather than the rates.",
        "",
        "## Measured with",
        "",
        "Every benchmark runs on bench/settings.py: the example project's settings with DEBUG "
        "off (with it on, Django records every query, which penalises whichever approach issues "
        "more statements) and `IDEMPOTENCY` at the library's defaults (the example turns "
        "`RECORD_DUPLICATES` on). Each column is what a measuring process read back from itself "
        "(Django's settings, the app's settings, the database session's isolation level), not "
        "what the settings module says.",
        "",
        *measured_with(claim, e2e),
        "",
        "## Targets",
        "",
        "The targets of issue 12 on PostgreSQL: the claim within 5% of a bare transaction, a "
        "duplicate discarded at six times the first-time rate, and the guarded Celery task at "
        "0.9x the unguarded one. Rows in parentheses have no target: they show how far the "
        "library is from the floor of its one statement. The `guarded task / the same "
        "transaction run directly` rows divide rates of different runs (a worker's and "
        "bench.claim's), not pairs.",
        "",
        *summary(claim, e2e),
    ]
    for section in sections:
        report += ["", f"## {section.title}", "", *section.render(results[section.key])]
    report += ["", "![throughput per approach](benchmarks.png)", ""]
    (out_dir / "benchmarks.md").write_text("\n".join(report))
    plot(claim, e2e, out_dir / "benchmarks.png")
    print(f"wrote {out_dir / 'benchmarks.md'} and {out_dir / 'benchmarks.png'}", file=sys.stderr)


def plot(claim: dict[str, Any], e2e: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(row[0] for row in claim["rates"]))
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 2]})
    width = 0.38
    for i, p in enumerate((1, 2)):
        values = [median_rate(claim["rates"], n, p) for n in names]
        left.barh(
            [y + i * width for y in range(len(names))], values, width, label=f"{p} process(es)"
        )
    left.set_yticks([y + width / 2 for y in range(len(names))], names)
    left.invert_yaxis()
    left.set_xlabel("events/s (median)")
    left.set_title("The PlaceOrder transaction on PostgreSQL")
    left.legend()
    rates = {(b, k, p): statistics.median(r) for b, k, p, r in e2e["rates"]}
    brokers = list(dict.fromkeys(row[0] for row in e2e["rates"]))
    labels = [f"{b} {k}" for b in brokers for k in ("unguarded", "guarded")]
    for i, p in enumerate((1, 2)):
        # (a smoke run measures some brokers with two processes only)
        values = [rates.get((b, k, p), 0.0) for b in brokers for k in ("unguarded", "guarded")]
        right.barh(
            [y + i * width for y in range(len(labels))], values, width, label=f"{p} process(es)"
        )
    right.set_yticks([y + width / 2 for y in range(len(labels))], labels)
    right.invert_yaxis()
    right.set_xlabel("tasks/s (median)")
    right.set_title("Through a real Celery worker")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
