"""What the exactly-once guard costs on PostgreSQL, against a bare transaction and alternatives.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/idempotency_bench python -m bench.claim

Each approach runs the same business transaction (an order, two items, two stock updates) for
N events in each of P processes (P = 1 and 2); the table shows events/s as the median and
min-max over the runs, and the ratio to the bare transaction measured in the same run.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
os.environ.setdefault("IDEMPOTENCY_LOG_LEVEL", "WARNING")

import django

django.setup()

from django.core.management import call_command  # noqa: E402
from django.db import (  # noqa: E402
    IntegrityError,
    connection,
    connections,
    reset_queries,
    transaction,
)
from django.test.utils import CaptureQueriesContext  # noqa: E402

from bench.workload import place  # noqa: E402
from idempotency.inbox import idempotent  # noqa: E402
from idempotency.models import ProcessedEvent  # noqa: E402
from orders.models import Customer, Product  # noqa: E402

CONSUMER = "bench.place_order"


@dataclass
class Worker:
    """What one process needs: its own products, so processes do not queue on row locks."""

    products: list[Product]
    customer: Customer


def business(worker: Worker, event_id: str) -> None:
    place([p.pk for p in worker.products], worker.customer.pk, event_id)


def bare(worker: Worker, event_id: str) -> None:
    with transaction.atomic():
        business(worker, event_id)


def ours(worker: Worker, event_id: str) -> None:
    with idempotent(CONSUMER, event_id) as claim:
        if claim.duplicate:
            return
        business(worker, event_id)


def naive_get_or_create(worker: Worker, event_id: str) -> None:
    with transaction.atomic():
        _, created = ProcessedEvent.objects.get_or_create(consumer=CONSUMER, event_id=event_id)
        if created:
            business(worker, event_id)


def two_commits(worker: Worker, event_id: str) -> None:
    # The inbox in its own, earlier transaction: a crash between the two commits loses the event.
    try:
        with transaction.atomic():
            ProcessedEvent.objects.create(consumer=CONSUMER, event_id=event_id)
    except IntegrityError:
        return
    with transaction.atomic():
        business(worker, event_id)


_redis = None


def redis_lock(worker: Worker, event_id: str) -> None:
    # celery-once style: a lock with a TTL outside the database. Nothing ties it to the commit:
    # a crash after SET loses the event until the TTL ends, and an expiry lets a duplicate in.
    global _redis
    if _redis is None:
        import redis

        _redis = redis.Redis.from_url(
            os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
        )
    if not _redis.set(f"bench:{event_id}", 1, nx=True, ex=3600):
        return
    with transaction.atomic():
        business(worker, event_id)


def duplicate(worker: Worker, event_id: str) -> None:
    ours(worker, event_id)


APPROACHES: dict[str, Callable[[Worker, str], None]] = {
    "bare": bare,
    "ours": ours,
    "naive get_or_create": naive_get_or_create,
    "inbox in an earlier transaction": two_commits,
    "redis lock (celery-once style)": redis_lock,
    "ours, duplicate discarded": duplicate,
}


def make_worker(index: int) -> Worker:
    products = [
        Product.objects.create(
            product_id=f"BENCH-{index}-{n}-{uuid.uuid4().hex[:6]}",
            name="bench",
            price=Decimal("15.00"),
            stock=10**9,
        )
        for n in range(2)
    ]
    customer = Customer.objects.create(customer_id=f"BENCH-{uuid.uuid4().hex[:8]}")
    return Worker(products, customer)


def child(name: str, worker: Worker, ids: list[str], barrier, results) -> None:  # type: ignore[no-untyped-def]
    connections.close_all()
    fn = APPROACHES[name]
    fn(worker, str(uuid.uuid4()))  # connect and warm up outside the timed part
    barrier.wait()
    start = time.monotonic()
    for event_id in ids:
        fn(worker, event_id)
    results.put((start, time.monotonic()))
    connections.close_all()


def reset() -> None:
    with connection.cursor() as cursor:
        cursor.execute(
            "TRUNCATE orders_orderitem, orders_order, idempotency_processedevent "
            "RESTART IDENTITY CASCADE"
        )
    if _redis is not None:
        _redis.flushdb()


def measure(name: str, processes: int, per_process: int) -> float:
    workers = [make_worker(i) for i in range(processes)]
    ids = [[str(uuid.uuid4()) for _ in range(per_process)] for _ in range(processes)]
    if name == "ours, duplicate discarded":
        for worker, batch in zip(workers, ids, strict=True):
            for event_id in batch:
                ours(worker, event_id)
    connections.close_all()
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(processes), ctx.Queue()
    procs = [
        ctx.Process(target=child, args=(name, w, batch, barrier, results))
        for w, batch in zip(workers, ids, strict=True)
    ]
    for p in procs:
        p.start()
    spans = [results.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
        if p.exitcode:
            sys.exit(f"{name}: a process failed with exit code {p.exitcode}")
    elapsed = max(end for _, end in spans) - min(start for start, _ in spans)
    return processes * per_process / elapsed


def duplicate_path_queries() -> list[str]:
    worker = make_worker(99)
    event_id = str(uuid.uuid4())
    ours(worker, event_id)
    reset_queries()
    with CaptureQueriesContext(connection) as ctx:
        ours(worker, event_id)
    return [q["sql"] for q in ctx.captured_queries]


def write_json(path: str, data: object) -> None:
    import json

    with open(path, "w") as out:
        json.dump(data, out, indent=1)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: few events, one run")
    parser.add_argument("--events", type=int, help="events per process (default 2000; quick 200)")
    parser.add_argument("--runs", type=int, help="runs per cell (default 3; quick 1)")
    parser.add_argument("--json", help="also write the measurements to this file")
    args = parser.parse_args()
    if connection.vendor != "postgresql":
        sys.exit("set DATABASE_URL=postgres://... : the benchmark measures PostgreSQL")
    per_process = args.events or (200 if args.quick else 2000)
    runs = args.runs or (1 if args.quick else 3)
    call_command("migrate", verbosity=0)

    table: dict[tuple[str, int], list[float]] = {}
    ratios: dict[tuple[str, int], list[float]] = {}
    for run in range(runs):
        for processes in (1, 2):
            rates: dict[str, float] = {}
            # Rotate the order so drift on a shared machine does not favour one approach.
            names = list(APPROACHES)
            names = names[run % len(names) :] + names[: run % len(names)]
            for name in names:
                reset()
                rates[name] = measure(name, processes, per_process)
                print(
                    f"run {run + 1}/{runs}  {processes} proc  {name:<32} {rates[name]:8.0f} /s",
                    file=sys.stderr,
                    flush=True,
                )
            for name, rate in rates.items():
                table.setdefault((name, processes), []).append(rate)
                ratios.setdefault((name, processes), []).append(rate / rates["bare"])
        reset()

    print()
    print(f"{per_process} events per process, {runs} run(s); ratio = rate / bare in the same run")
    print()
    print("| approach | processes | events/s median | min-max | ratio to bare (median) |")
    print("|---|---:|---:|---:|---:|")
    for (name, processes), rates in table.items():
        r = statistics.median(ratios[(name, processes)])
        print(
            f"| {name} | {processes} | {statistics.median(rates):,.0f} | "
            f"{min(rates):,.0f}-{max(rates):,.0f} | {r:.2f}x |"
        )
    queries = duplicate_path_queries()
    if args.json:
        write_json(
            args.json,
            {
                "events_per_process": per_process,
                "runs": runs,
                "rates": [[name, p, rates] for (name, p), rates in table.items()],
                "ratios": [[name, p, r] for (name, p), r in ratios.items()],
                "duplicate_path_sql": queries,
            },
        )
    print()
    print(f"Duplicate path: {len(queries)} SQL statements:")
    for sql in queries:
        print(f"  {sql[:140]}")


if __name__ == "__main__":
    main()
