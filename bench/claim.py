"""What the exactly-once guard costs on PostgreSQL, against a bare transaction, the floor of
its one statement, and alternatives.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/idempotency_bench python -m bench.claim

Each approach runs the same business transaction (an order, two items, two stock updates) for
N events in each of P processes (P = 1 and 2). The approaches are interleaved: each round runs
every approach once, in alternating order (bare, ours, floor, ..., then ..., floor, ours, bare),
so an approach and the bare transaction are measured close together in time, and each ratio is
taken within its round. The table shows events/s (median and min-max over the rounds) and the
ratio to bare (the median and min-max of the per-round ratios): on a shared machine a single
pair of runs moves by 20%, the median of several pairs far less.

Settings: bench/settings.py (DEBUG off, the library's defaults); ``--debug`` and
``--idempotency KEY=JSON`` measure otherwise (bench/runtime.py). The row "RECORD_DUPLICATES on"
turns that setting on for its own processes only.
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
from typing import Any

from bench import runtime

runtime.setup()

from django.conf import settings  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.db import (  # noqa: E402
    IntegrityError,
    connection,
    connections,
    models,
    reset_queries,
    transaction,
)
from django.test.utils import CaptureQueriesContext, override_settings  # noqa: E402

from bench.workload import place  # noqa: E402
from idempotency.inbox import idempotent  # noqa: E402
from idempotency.inbox.statements import forget_duplicate_rates  # noqa: E402
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


def floor_statement() -> tuple[str, list[Any], int]:
    """The inbox's one statement, by hand: its SQL, its parameters, and the event id's slot.

    The columns come from the model's concrete fields, each with its default (a column with a
    database default, or generated, is left to the database), so a change to the inbox's
    schema changes the statement with it instead of breaking it.
    """
    columns: list[str] = []
    params: list[Any] = []
    slot = -1
    quote = connection.ops.quote_name
    for field in ProcessedEvent._meta.concrete_fields:
        if (
            field.primary_key
            or getattr(field, "generated", False)
            or field.db_default is not models.NOT_PROVIDED
        ):
            continue
        if field.name == "event_id":
            slot, value = len(params), ""
        elif field.name == "consumer":
            value = CONSUMER
        elif field.has_default():
            value = field.get_default()
        elif field.null:
            value = None
        else:
            sys.exit(f"floor: {field.name} has no default; say here what a first claim writes")
        columns.append(quote(field.column))
        params.append(field.get_db_prep_save(value, connection))
    if slot < 0:
        sys.exit("floor: the inbox has no event_id field")
    sql = (
        f"INSERT INTO {quote(ProcessedEvent._meta.db_table)} ({', '.join(columns)}) "
        f"VALUES ({', '.join(['%s'] * len(columns))}) ON CONFLICT DO NOTHING "
        f"RETURNING {quote(ProcessedEvent._meta.pk.column)}"
    )
    return sql, params, slot


_floor: tuple[str, list[Any], int] | None = None


def floor(worker: Worker, event_id: str) -> None:
    # What no library can beat: the record's one INSERT, prepared once, in the same
    # transaction as the business change; a duplicate (no row returned) skips the change.
    global _floor
    if _floor is None:
        _floor = floor_statement()
    sql, params, slot = _floor
    params = params.copy()
    params[slot] = event_id
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            if cursor.fetchone() is None:
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


FIRST = "ours"
FLOOR = "floor: raw INSERT ... ON CONFLICT DO NOTHING"
DUPLICATE = "ours, duplicate discarded"
RECORDED = "ours, duplicate discarded, RECORD_DUPLICATES on"
#: Not measured for its rate: the statements of a duplicate arriving among first deliveries.
LONE_DUPLICATE = "ours, a duplicate among first deliveries"
APPROACHES: dict[str, Callable[[Worker, str], None]] = {
    # bare, ours and the floor first: the alternating order keeps ours next to bare.
    "bare": bare,
    FIRST: ours,
    FLOOR: floor,
    "naive get_or_create": naive_get_or_create,
    "inbox in an earlier transaction": two_commits,
    "redis lock (celery-once style)": redis_lock,
    DUPLICATE: duplicate,
    RECORDED: duplicate,
}
#: Approaches that run on events already claimed.
DUPLICATES = {DUPLICATE, RECORDED}
#: Approaches measured with settings of their own, in their own processes only.
OVERRIDES: dict[str, dict[str, Any]] = {RECORDED: {"RECORD_DUPLICATES": True}}
#: The ratios a round yields, each of two approaches measured in that round.
PAIRS = {
    "ours / bare": (FIRST, "bare"),
    "floor / bare": (FLOOR, "bare"),
    "ours / floor": (FIRST, FLOOR),
    "duplicate / first-time": (DUPLICATE, FIRST),
    "duplicate, RECORD_DUPLICATES on / first-time": (RECORDED, FIRST),
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
    overrides = OVERRIDES.get(name)
    with override_settings(IDEMPOTENCY={**settings.IDEMPOTENCY, **(overrides or {})}):
        fn(worker, ids[0] if name in DUPLICATES else str(uuid.uuid4()))  # connect, warm up
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


def claimed(ids: list[str]) -> None:
    """Records of *ids*, as a first claim of each leaves them, for the duplicate path."""
    sql, params, slot = floor_statement()
    with transaction.atomic(), connection.cursor() as cursor:
        for event_id in ids:
            params[slot] = event_id
            cursor.execute(sql, params)


def measure(name: str, processes: int, per_process: int) -> float:
    reset()
    workers = [make_worker(i) for i in range(processes)]
    ids = [[str(uuid.uuid4()) for _ in range(per_process)] for _ in range(processes)]
    if name in DUPLICATES:
        claimed([event_id for batch in ids for event_id in batch])
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


def path_queries() -> dict[str, list[str]]:
    """The statements of each path, first-time and duplicate, captured (DEBUG or not).

    The claim's statement follows the consumer's recent duplicate rate (statements.py): a
    first delivery is captured as a new process sends it, a duplicate both as the measured
    runs of duplicates send it and alone among first deliveries.
    """
    reset()
    worker = make_worker(99)
    paths: dict[str, list[str]] = {}
    forget_duplicate_rates()
    for name, fn in (("bare", bare), (FIRST, ours), (FLOOR, floor)):
        reset_queries()
        with CaptureQueriesContext(connection) as ctx:
            fn(worker, str(uuid.uuid4()))
        paths[name] = [q["sql"] for q in ctx.captured_queries]
    event_id = str(uuid.uuid4())
    ours(worker, event_id)
    with CaptureQueriesContext(connection) as ctx:
        ours(worker, event_id)
    paths[LONE_DUPLICATE] = [q["sql"] for q in ctx.captured_queries]
    for name in (DUPLICATE, RECORDED):
        idempotency = {**settings.IDEMPOTENCY, **OVERRIDES.get(name, {})}
        with override_settings(IDEMPOTENCY=idempotency):
            for _ in range(20):  # a run of duplicates, as measured
                ours(worker, event_id)
            with CaptureQueriesContext(connection) as ctx:
                ours(worker, event_id)
        paths[name] = [q["sql"] for q in ctx.captured_queries]
    forget_duplicate_rates()
    reset()
    return paths


def write_json(path: str, data: object) -> None:
    import json

    with open(path, "w") as out:
        json.dump(data, out, indent=1)


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(min(values))}-{fmt.format(max(values))}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: few events, 5 rounds")
    parser.add_argument(
        "--events", type=int, help="events per process and round (default 400; quick 60)"
    )
    parser.add_argument("--rounds", type=int, help="rounds (default 9; quick 5)")
    parser.add_argument(
        "--approach", action="append", choices=list(APPROACHES), help="only these (repeatable)"
    )
    parser.add_argument("--json", help="also write the measurements to this file")
    runtime.add_arguments(parser)
    args = parser.parse_args()
    runtime.require_postgresql()
    per_process = args.events or (60 if args.quick else 400)
    rounds = args.rounds or (5 if args.quick else 9)
    names = [n for n in APPROACHES if not args.approach or n in args.approach or n == "bare"]
    call_command("migrate", verbosity=0)
    measured_with = runtime.describe()
    started = time.monotonic()

    table: dict[tuple[str, int], list[float]] = {}
    ratios: dict[tuple[str, int], list[float]] = {}
    pairs: dict[tuple[str, int], list[float]] = {}
    for processes in (1, 2):
        for round_ in range(rounds):
            # Alternate the order, so drift on a shared machine favours no approach, and ours
            # stays next to bare either way.
            order = names if round_ % 2 == 0 else names[::-1]
            rates: dict[str, float] = {}
            for name in order:
                rates[name] = measure(name, processes, per_process)
                print(
                    f"round {round_ + 1}/{rounds}  {processes} proc  {name:<48} "
                    f"{rates[name]:8.0f} /s",
                    file=sys.stderr,
                    flush=True,
                )
            for name, rate in rates.items():
                table.setdefault((name, processes), []).append(rate)
                ratios.setdefault((name, processes), []).append(rate / rates["bare"])
            for label, (a, b) in PAIRS.items():
                if a in rates and b in rates:
                    pairs.setdefault((label, processes), []).append(rates[a] / rates[b])
    reset()
    elapsed = time.monotonic() - started

    print(
        f"{per_process} events per process in each of {rounds} rounds, the approaches "
        f"interleaved ({elapsed / 60:.1f} minutes); ratio = rate / bare in the same round"
    )
    print()
    print("| approach | processes | events/s median | min-max | ratio to bare median | min-max |")
    print("|---|---:|---:|---:|---:|---:|")
    for processes in (1, 2):
        for name in names:
            rates_ = table[(name, processes)]
            r = ratios[(name, processes)]
            print(
                f"| {name} | {processes} | {statistics.median(rates_):,.0f} | "
                f"{spread(rates_, '{:,.0f}')} | {statistics.median(r):.2f}x | {spread(r)} |"
            )
    print()
    print(f"Ratios of two approaches measured in the same round ({rounds} pairs each):")
    print()
    print("| ratio | processes | median | min-max |")
    print("|---|---:|---:|---:|")
    for (label, processes), values in pairs.items():
        print(f"| {label} | {processes} | {statistics.median(values):.2f}x | {spread(values)} |")
    queries = path_queries()
    if args.json:
        write_json(
            args.json,
            {
                "events_per_process": per_process,
                "rounds": rounds,
                "seconds": elapsed,
                "settings": measured_with,
                "overrides": {name: OVERRIDES[name] for name in names if name in OVERRIDES},
                "rates": [[name, p, rates] for (name, p), rates in table.items()],
                "ratios": [[name, p, r] for (name, p), r in ratios.items()],
                "pairs": [[label, p, r] for (label, p), r in pairs.items()],
                "path_sql": queries,
                "duplicate_path_sql": queries[DUPLICATE],
            },
        )
    print()
    print("Statements per event, each path (the bare transaction's own included):")
    print()
    for name, statements in queries.items():
        print(f"* {name}: {len(statements)}")
    print()
    print(
        "The claim's statement follows each consumer's recent duplicate rate: while duplicates "
        "are rare, a first delivery sends only its INSERT and a duplicate reads the record in "
        "a SELECT of its own; in a run of duplicates (as measured here) the SELECT rides in "
        "the INSERT's round trip."
    )
    for name in (DUPLICATE, LONE_DUPLICATE):
        print()
        print(f"{name}, with the settings measured ({len(queries[name])} statements):")
        print()
        for sql in queries[name]:
            # Long statements by their ends: the INSERT's columns, and whether a SELECT follows.
            print(f"    {sql if len(sql) <= 140 else sql[:90] + ' ... ' + sql[-45:]}")


if __name__ == "__main__":
    main()
