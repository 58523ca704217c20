"""``make bench``: every benchmark in one run on PostgreSQL, written to docs/benchmarks.md.

    python -m bench            # the full run (under 10 minutes): docs/benchmarks.md and .png
    python -m bench --quick    # a smoke run (about a minute), written under var/bench/

DATABASE_URL names the benchmark database (default postgres://postgres@127.0.0.1:5432/
idempotency_bench); it is dropped and created afresh, so its name must end in ``_bench``.
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
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench.database import bench_url, recreate

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {
    "ours": 0.95,
    "duplicate": 6.0,
    "guarded_vs_unguarded": 0.9,
    "guarded_vs_direct": 0.8,
}


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
    code = (
        "import django, celery, kombu, psycopg, redis, json;"
        "from django.db import connection;"
        "from kombu import Connection;"
        "c = connection.cursor(); c.execute('show server_version');"
        "pg = c.fetchone()[0];"
        "amqp = Connection('amqp://guest:guest@127.0.0.1:5672//'); amqp.connect();"
        "rabbit = amqp.connection.server_properties.get('version', '?'); amqp.release();"
        "r = redis.Redis.from_url('redis://127.0.0.1:6379/0').info()['redis_version'];"
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
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    memory = int(Path("/proc/meminfo").read_text().split()[1]) // 1024 // 1024
    return f"{os.cpu_count()} cores ({cpu}), {memory} GiB, {platform.system()} {platform.release()}"


def median_of(rows: list[list[Any]], name: str, processes: int) -> float:
    return statistics.median(next(r[2] for r in rows if r[0] == name and r[1] == processes))


def summary(claim: dict[str, Any], e2e: list[list[Any]]) -> list[str]:
    """The targets, each with the figure measured in this run."""
    lines = ["| target | measured | met |", "|---|---:|:---:|"]

    def add(what: str, value: float, target: float, unit: str = "x") -> None:
        lines.append(
            f"| {what} >= {target:g}{unit} | {value:.2f}{unit} | "
            f"{'yes' if value >= target else 'no'} |"
        )

    for p in (1, 2):
        ours = median_of(claim["ratios"], "ours", p)
        add(f"ours first-time / bare, {p} process(es)", ours, TARGETS["ours"])
        dup = median_of(claim["rates"], "ours, duplicate discarded", p)
        first = median_of(claim["rates"], "ours", p)
        add(f"duplicate discard / first-time, {p} process(es)", dup / first, TARGETS["duplicate"])
    rates = {(b, k, p): statistics.median(r) for b, k, p, r in e2e}
    for broker in ("rabbitmq", "redis"):
        for p in (1, 2):
            guarded, unguarded = rates[(broker, "guarded", p)], rates[(broker, "unguarded", p)]
            add(
                f"{broker}: guarded / unguarded task, {p} process(es)",
                guarded / unguarded,
                TARGETS["guarded_vs_unguarded"],
            )
            direct = median_of(claim["rates"], "ours", p)
            add(
                f"{broker}: guarded task / the same transaction run directly, {p} process(es)",
                guarded / direct,
                TARGETS["guarded_vs_direct"],
            )
    return lines


def e2e_table(e2e: list[list[Any]]) -> list[str]:
    rates = {(b, k, p): r for b, k, p, r in e2e}
    lines = [
        "| broker | processes | task | tasks/s median | min-max | guarded / unguarded |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for (broker, kind, p), r in sorted(rates.items()):
        ratio = statistics.median(r) / statistics.median(rates[(broker, "unguarded", p)])
        lines.append(
            f"| {broker} | {p} | {kind} | {statistics.median(r):,.0f} | "
            f"{min(r):,.0f}-{max(r):,.0f} | {ratio:.2f}x |"
        )
    return lines


def plot(claim: dict[str, Any], e2e: list[list[Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(row[0] for row in claim["rates"]))
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 2]})
    width = 0.38
    for i, p in enumerate((1, 2)):
        values = [median_of(claim["rates"], n, p) for n in names]
        left.barh(
            [y + i * width for y in range(len(names))], values, width, label=f"{p} process(es)"
        )
    left.set_yticks([y + width / 2 for y in range(len(names))], names)
    left.invert_yaxis()
    left.set_xlabel("events/s (median)")
    left.set_title("The PlaceOrder transaction on PostgreSQL")
    left.legend()
    rates = {(b, k, p): statistics.median(r) for b, k, p, r in e2e}
    brokers = list(dict.fromkeys(row[0] for row in e2e))
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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run, written under var/bench/"
    )
    args = parser.parse_args()
    quick = ["--quick"] if args.quick else []
    out_dir = ROOT / ("var/bench" if args.quick else "docs")
    out_dir.mkdir(parents=True, exist_ok=True)
    scratch = ROOT / "var" / "bench"
    scratch.mkdir(parents=True, exist_ok=True)
    url = bench_url()
    env = {
        **os.environ,
        "DATABASE_URL": url,
        "IDEMPOTENCY_RECORD_DUPLICATES": "0",  # the library's default: a duplicate writes nothing
        "IDEMPOTENCY_LOG_LEVEL": "WARNING",
    }
    started = time.monotonic()
    recreate(url)
    subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=ROOT, env=env, check=True)
    claim_table = run("bench.claim", [*quick, "--json", str(scratch / "claim.json")], env)
    e2e_text = run("bench.celery_e2e", [*quick, "--json", str(scratch / "e2e.json")], env)
    # The reference strategies (one DELETE, pk IN (...)) are for `make bench-purge`: they would
    # take this run past its ten minutes.
    purge_table = run("bench.purge", [*quick, "--no-reference"], env)
    claim = json.loads((scratch / "claim.json").read_text())
    e2e = json.loads((scratch / "e2e.json").read_text())
    elapsed = time.monotonic() - started
    del e2e_text  # the report formats its own table, with ratios

    report = [
        "# Benchmarks",
        "",
        f"Generated by `make bench{' ARGS=--quick' if args.quick else ''}` on "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC in {elapsed / 60:.1f} minutes.",
        f"Machine: {machine()}.",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in versions(env).items()) + ".",
        "Each figure is the median (and range) over the runs; each ratio is taken within the same "
        "run. The machine is shared, so compare the ratios rather than the absolute rates.",
        "",
        "## Targets",
        "",
        *summary(claim, e2e),
        "",
        "## The claim against a bare transaction and the alternatives",
        "",
        claim_table.strip(),
        "",
        "## Celery end to end",
        "",
        *e2e_table(e2e),
        "",
        "The `sqs` rows run through moto's SQS emulator on the same machine (or `BENCH_SQS_URL`):",
        "they measure the example's SQS path with the emulator's speed, not Amazon SQS's.",
        "",
        "## Purge",
        "",
        purge_table.strip(),
        "",
        "![throughput per approach](benchmarks.png)",
        "",
    ]
    (out_dir / "benchmarks.md").write_text("\n".join(report))
    plot(claim, e2e, out_dir / "benchmarks.png")
    print(f"wrote {out_dir / 'benchmarks.md'} and {out_dir / 'benchmarks.png'}", file=sys.stderr)


if __name__ == "__main__":
    main()
