"""Tasks per second through a real ``celery worker``, guarded by the inbox or not, per broker.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/idempotency_bench python -m bench.celery_e2e

The queue is filled first, then a worker with P pool processes drains it; the rate is taken from
the orders' own timestamps (first to last), so worker start-up does not count. The guarded and
the unguarded task run in pairs, one right after the other in alternating order, and each ratio
(guarded / unguarded) is taken within its pair; the report gives the median and min-max of the
pairs' ratios. The workers run on bench/settings.py (DEBUG off, the library's defaults), as
this process does, and each reports the settings it ran with.

``--profile`` adds a run of each task on one pool process under cProfile, in the pool child and
in the worker's main process (bench/tasks.py), and prints where a task's time goes
(bench/workerprofile.py).

SQS runs against ``BENCH_SQS_URL`` or, without it, a ``moto_server`` (an emulator of the SQS API,
``requirements/dev.txt``) started on a free loopback port for the run: that row measures the
example's SQS path through the emulator, not Amazon SQS's throughput.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench import runtime

runtime.setup()

from django.db import connection  # noqa: E402
from django.db.models import Max, Min  # noqa: E402
from kombu import Connection  # noqa: E402

from bench import workerprofile  # noqa: E402
from bench.claim import write_json  # noqa: E402
from bench.tasks import guarded, unguarded  # noqa: E402
from orders.models import Customer, Order, Product  # noqa: E402
from project import sqs  # noqa: E402
from project.queues import dead_letter_queue, work_queue  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BROKERS = {
    "rabbitmq": os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//"),
    "redis": os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/13"),
    # The example's embedded default (project/embedded_broker.py), in a directory of its own.
    "embedded": "filesystem://",
    "sqs": os.environ.get("BENCH_SQS_URL", ""),
}
EMBEDDED_TASKS = 200
#: Tasks per SQS run of a quick (smoke) run: one pool process drains about 1-2 a second
#: (kombu's SQS channel waits for the event loop's next 1 s tick after each acknowledgement:
#: docs/benchmarks.md, Celery end to end).
QUICK_SQS_TASKS = 30
#: Tasks per SQS run with one pool process, the full run's too: at 1-2 a second, 500 took four
#: minutes a run and most of the section's time; 60 give the same rate in under a minute.
SQS_ONE_PROCESS_TASKS = 60
#: What a process needs to reach the local emulator (any credentials do; plain HTTP).
SQS_ENV = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_DEFAULT_REGION": "us-east-1",
    "CELERY_SQS_SECURE": "0",
    # A worker's poll returns within 2 s of the queue running dry, so it stops soon after.
    "CELERY_SQS_WAIT_TIME_SECONDS": "2",
}
# CELERY_EMBEDDED_TRANSPORT=filesystem: kombu's transport as it comes (project/settings.py).
EMBEDDED_TRANSPORT = os.environ.get(
    "CELERY_EMBEDDED_TRANSPORT", "project.embedded_broker:Transport"
)
TASKS = {"unguarded": unguarded, "guarded": guarded}
PAIRS = 8  # product pairs the events spread over, so pool processes rarely share a row lock


def reset() -> tuple[list[list[int]], int]:
    with connection.cursor() as cursor:
        cursor.execute(
            "TRUNCATE orders_orderitem, orders_order, idempotency_processedevent "
            "RESTART IDENTITY CASCADE"
        )
    stamp = uuid.uuid4().hex[:6]
    pairs = [
        [
            Product.objects.create(
                product_id=f"E2E-{stamp}-{n}-{k}", name="bench", price=15, stock=10**9
            ).pk
            for k in range(2)
        ]
        for n in range(PAIRS)
    ]
    customer = Customer.objects.create(customer_id=f"E2E-{stamp}").pk
    return pairs, customer


def database_url() -> str:
    s = connection.settings_dict
    auth = f"{s['USER']}@" if s.get("USER") else ""
    return f"postgres://{auth}{s.get('HOST') or '127.0.0.1'}:{s.get('PORT') or 5432}/{s['NAME']}"


@contextlib.contextmanager
def local_sqs() -> Iterator[str]:
    """A moto_server on a free loopback port for the run; its kombu URL."""
    binary = shutil.which("moto_server", path=str(Path(sys.executable).parent))
    if binary is None:
        sys.exit("moto_server is not installed (requirements/dev.txt); or set BENCH_SQS_URL")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [binary, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            if server.poll() is not None or time.monotonic() > deadline:
                sys.exit("moto_server did not start")
            time.sleep(0.2)
        yield f"sqs://bench:bench@127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(30)


#: What the workers of the last run reported about themselves: ``{"main": [...], "child": [...]}``.
reports: dict[str, list[dict[str, Any]]] = {}


def run_once(
    broker: str, kind: str, processes: int, tasks: int, profile: Path | None = None
) -> float:
    pairs, customer = reset()
    queue_name = f"bench-{uuid.uuid4().hex[:10]}"
    queue = work_queue(queue_name)
    url = BROKERS[broker]
    task = TASKS[kind]
    var_dir = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    connect: dict[str, Any] = {}
    if broker == "embedded":
        # The folders project/settings.py derives from VAR_DIR for the worker.
        folders = {n: var_dir / "broker" / n for n in ("queue", "control")}
        for folder in folders.values():
            folder.mkdir(parents=True)
        connect = {
            "transport": EMBEDDED_TRANSPORT,
            "transport_options": {
                "data_folder_in": str(folders["queue"]),
                "data_folder_out": str(folders["queue"]),
                "control_folder": str(folders["control"]),
            },
        }
    if broker == "sqs":
        # As project/settings.py configures the producers (the worker reads the same env).
        options = sqs.transport_options({**os.environ, **SQS_ENV}, visibility_timeout=900)
        connect = {"transport_options": options}
    with Connection(url, **connect) as conn:
        producer_queue = queue.bind(conn.default_channel)
        producer_queue.declare()
        for n in range(tasks):
            event = {
                "eventId": str(uuid.uuid4()),
                "products": pairs[n % PAIRS],
                "customer": customer,
            }
            task.apply_async(args=[event], queue=queue, connection=conn)
    env = {
        **os.environ,
        **(SQS_ENV if broker == "sqs" and "127.0.0.1" in url else {}),
        "DATABASE_URL": database_url(),
        "CELERY_BROKER_URL": url,
        "CELERY_QUEUE": queue_name,
        "CELERY_SKIP_CHECKS": "1",
        "IDEMPOTENCY_LOG_LEVEL": "WARNING",
        "VAR_DIR": str(var_dir),
        "BENCH_WORKER_DIR": str(profile or var_dir / "worker"),
        "BENCH_PROFILE": "1" if profile else "0",
    }
    command = [
        sys.executable, "-m", "celery", "-A", "project", "worker", "--loglevel=WARNING",
        f"--concurrency={processes}", "--pool=prefork", "--include=bench.tasks",
        "--without-gossip", "--without-mingle", "--without-heartbeat",
        f"--hostname=bench-{queue_name}@%h",
    ]  # fmt: skip
    with tempfile.TemporaryFile() as log:
        worker = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 600
            while Order.objects.count() < tasks:
                if worker.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    sys.exit(f"the worker stopped or stalled:\n{log.read().decode()[-3000:]}")
                time.sleep(0.2)
        finally:
            worker.terminate()
            worker.wait(60)
    with Connection(url, **connect) as conn:
        for q in (queue, dead_letter_queue(queue_name)):
            q.bind(conn.default_channel).delete()
    reports.clear()
    for path in sorted(Path(env["BENCH_WORKER_DIR"]).glob("*.json")):
        report = json.loads(path.read_text())
        reports.setdefault(report["role"], []).append(report)
    shutil.rmtree(var_dir, ignore_errors=True)
    span = Order.objects.aggregate(first=Min("created_at"), last=Max("created_at"))
    return (tasks - 1) / (span["last"] - span["first"]).total_seconds()


def measure(
    pairs: int, tasks: int, processes: tuple[int, ...], brokers: list[str], quick: bool = False
) -> tuple[dict[tuple[str, str, int], list[float]], dict[tuple[str, int], list[float]]]:
    """Rates per (broker, task, processes), and guarded / unguarded per pair of runs."""
    results: dict[tuple[str, str, int], list[float]] = {}
    ratios: dict[tuple[str, int], list[float]] = {}
    for broker in brokers:
        # A smoke run starts a worker per cell: the slow development and emulated brokers
        # get one cell each (two processes), which exercises them all the same.
        slow = broker in ("embedded", "sqs")
        cells = (processes[-1],) if quick and slow else processes
        for p in cells:
            # The embedded broker is a development one, some 10 times slower, and the emulated
            # SQS too: fewer tasks and pairs keep `make bench` within its time, and still give
            # a rate.
            n = min(tasks, EMBEDDED_TASKS) if broker == "embedded" else tasks
            if broker == "sqs" and p == 1:
                n = min(tasks, SQS_ONE_PROCESS_TASKS)
            if quick and broker == "sqs":
                n = min(tasks, QUICK_SQS_TASKS)
            for pair in range(max(1, pairs // 2) if slow else pairs):
                rates: dict[str, float] = {}
                for kind in TASKS if pair % 2 == 0 else reversed(TASKS):
                    rates[kind] = run_once(broker, kind, p, n)
                    results.setdefault((broker, kind, p), []).append(rates[kind])
                    print(
                        f"pair {pair + 1}  {broker:<8} {p} proc  {kind:<9} "
                        f"{rates[kind]:7.1f} tasks/s",
                        file=sys.stderr,
                        flush=True,
                    )
                ratios.setdefault((broker, p), []).append(rates["guarded"] / rates["unguarded"])
    return results, ratios


def profile(brokers: list[str], tasks: int, pairs: int) -> dict[str, Any]:
    """Each task on one pool process under cProfile, in *pairs* alternating pairs per broker:
    where its time goes, the pairs' profiles summed."""
    profiles: dict[str, Any] = {}
    for broker in brokers:
        runs: dict[str, list[dict[str, Any]]] = {kind: [] for kind in TASKS}
        for pair in range(pairs):
            for kind in TASKS if pair % 2 == 0 else reversed(TASKS):
                directory = Path(tempfile.mkdtemp(prefix="bench-profile-"))
                rate = run_once(broker, kind, 1, tasks, profile=directory)
                runs[kind].append({"rate": rate, **workerprofile.analyse(directory)})
                shutil.rmtree(directory, ignore_errors=True)
                print(
                    f"profiled pair {pair + 1}  {broker:<8} 1 proc  {kind:<9} {rate:7.1f} tasks/s "
                    "(under cProfile)",
                    file=sys.stderr,
                    flush=True,
                )
        profiles[broker] = {kind: workerprofile.merge(found) for kind, found in runs.items()}
    return profiles


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run")
    parser.add_argument("--tasks", type=int, help="tasks per run (default 500; quick 100)")
    parser.add_argument(
        "--pairs",
        type=int,
        help="pairs of runs per cell (default 5, half for embedded and sqs; quick 1)",
    )
    parser.add_argument("--json", help="also write the measurements to this file")
    parser.add_argument(
        "--broker", action="append", choices=list(BROKERS), help="only this broker (repeatable)"
    )
    parser.add_argument(
        "--profile",
        action="append",
        choices=list(BROKERS),
        help="also profile a worker of this broker (repeatable)",
    )
    runtime.add_arguments(parser)
    args = parser.parse_args()
    runtime.require_postgresql()
    brokers = args.broker or list(BROKERS)
    with contextlib.ExitStack() as stack:
        if "sqs" in brokers and not BROKERS["sqs"]:
            BROKERS["sqs"] = stack.enter_context(local_sqs())
        tasks = args.tasks or (100 if args.quick else 500)
        results, ratios = measure(
            args.pairs or (1 if args.quick else 5), tasks, (1, 2), brokers, quick=args.quick
        )
        measured_with = {role: found[0]["settings"] for role, found in reports.items()}
        profiles = profile(args.profile or [], tasks, 1 if args.quick else 2)
    if args.json:
        write_json(
            args.json,
            {
                "tasks": tasks,
                "sqs_one_process_tasks": min(
                    tasks, QUICK_SQS_TASKS if args.quick else SQS_ONE_PROCESS_TASKS
                ),
                "settings": measured_with,
                "rates": [[b, k, p, rates] for (b, k, p), rates in results.items()],
                "pairs": [[b, p, r] for (b, p), r in ratios.items()],
                "profiles": profiles,
            },
        )
    print("| broker | processes | task | tasks/s median | min-max | guarded / unguarded |")
    print("|---|---:|---|---:|---:|---:|")
    for (broker, kind, p), rates in results.items():
        median, low, high = statistics.median(rates), min(rates), max(rates)
        r = ratios[(broker, p)]
        ratio = ""
        if kind == "guarded":
            ratio = f"{statistics.median(r):.2f}x ({min(r):.2f}-{max(r):.2f})"
        print(f"| {broker} | {p} | {kind} | {median:,.0f} | {low:,.0f}-{high:,.0f} | {ratio} |")
    for broker, runs in profiles.items():
        print()
        print(f"Where a task's time goes, {broker}, 1 pool process, under cProfile:")
        print()
        print("\n".join(workerprofile.table(runs)))


if __name__ == "__main__":
    main()
