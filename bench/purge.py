"""How fast a purge deletes expired records on PostgreSQL, what it costs concurrent claims, and
how much storage a record takes.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/idempotency_bench python -m bench.purge

Each run fills the inbox with N records (default 1,000,000), the older half past the 30-day
retention, then VACUUMs and CHECKPOINTs so every run starts alike (the first change to a page
after a checkpoint writes the whole page to the WAL, as it does in production). Another process
meanwhile claims new events with ``idempotency.inbox.idempotent`` at a steady rate; the table
shows the purge's rate and the latency of the claims made while it ran, next to the claims
made just before it. A second table measures the bytes each record takes.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from bench import runtime

runtime.setup()  # bench/settings.py: DEBUG off, the library's defaults

from django.core.management import call_command  # noqa: E402
from django.db import connection, connections  # noqa: E402
from django.utils import timezone  # noqa: E402

from bench.database import percentile, sql  # noqa: E402
from idempotency.inbox import idempotent  # noqa: E402
from idempotency.models import ProcessedEvent  # noqa: E402

TABLE = ProcessedEvent._meta.db_table
CONSUMERS = ["orders.tasks.place_order", "billing.tasks.debit", "shipping.tasks.ship"]
CLAIMER = "bench.claimer"
RETENTION = timedelta(days=30)


# --- Filling the inbox ------------------------------------------------------------------------
SHAPES = {
    # fingerprint and result as the orders example writes them; payloads not stored (default)
    "default": (
        "sha256(g::text::bytea)",
        RESULT := """jsonb_build_object(
        'orderId', 'ORD-' || g, 'status', 'accepted', 'reason', '')""",
        "NULL",
    ),
    "minimal": ("''::bytea", "NULL", "NULL"),
    "stored payloads": (
        "sha256(g::text::bytea)",
        RESULT,
        """jsonb_build_object('eventType', 'PlaceOrder', 'eventId', gen_random_uuid(),
        'orderId', 'ORD-' || g, 'customerId', 'CUST-' || (g %% 1000),
        'items', jsonb_build_array(jsonb_build_object('productId', 'PROD-A', 'quantity', 2),
                                   jsonb_build_object('productId', 'PROD-B', 'quantity', 1)),
        'timestamp', '2026-10-27T10:00:00Z')""",
    ),
}


def fill(rows: int, now: datetime, shape: str = "default") -> int:
    """*rows* records in claim order, the older half expired; the number expired."""
    fingerprint, result, payload = SHAPES[shape]
    expired = rows // 2
    sql(f"TRUNCATE {TABLE} RESTART IDENTITY")
    # Expired: spread over the 30 days before the cutoff; kept: over the 29 days after it.
    sql(
        f"""
        INSERT INTO {TABLE} (consumer, event_id, processed_at, outcome, reason, fingerprint,
                             mismatch_fingerprint, result, payload, duplicate_count)
        SELECT (%s::text[])[1 + g %% %s], gen_random_uuid()::text,
               CASE WHEN g <= %s
                    THEN %s::timestamptz - interval '60 days' + ((g - 1) * interval '30 days') / %s
                    ELSE %s::timestamptz - interval '29 days'
                         + ((g - %s) * interval '29 days') / %s
               END,
               'processed', '', {fingerprint}, ''::bytea, {result}, {payload}, 0
        FROM generate_series(1, %s) AS g
        """,
        [CONSUMERS, len(CONSUMERS), expired, now, expired, now, expired, rows - expired, rows],
    )
    sql(f"VACUUM ANALYZE {TABLE}")
    sql("CHECKPOINT")
    return expired


# --- The concurrent claimer ---------------------------------------------------------------------
def claimer(rate: float, ready, stop, results) -> None:  # type: ignore[no-untyped-def]
    """Claim new events at *rate* per second until *stop*; report (start, seconds) per claim."""
    connections.close_all()
    interval = 1 / rate
    samples: list[tuple[float, float]] = []

    def claim_one() -> None:
        event_id = str(uuid.uuid4())
        with idempotent(CLAIMER, event_id, payload={"eventId": event_id}):
            pass

    for _ in range(50):  # connect and warm up
        claim_one()
    ready.set()
    next_at = time.monotonic()
    while not stop.is_set():
        start = time.monotonic()
        claim_one()
        samples.append((start, time.monotonic() - start))
        next_at = max(next_at + interval, time.monotonic())
        time.sleep(max(0.0, next_at - time.monotonic()))
    results.put(samples)
    connections.close_all()


# --- Purge strategies -----------------------------------------------------------------------------
def ours(batch_size: int) -> Callable[[datetime], int]:
    def run(now: datetime) -> int:
        return ProcessedEvent.objects.purge(batch_size=batch_size, now=now)

    return run


def pk_in_subquery(batch_size: int) -> Callable[[datetime], int]:
    """The common alternative: DELETE ... WHERE id IN (SELECT id ... LIMIT n), until none."""

    def run(now: datetime) -> int:
        expired = ProcessedEvent.objects.purgeable(now=now).order_by("pk")
        total = 0
        while True:
            deleted, _ = ProcessedEvent.objects.filter(
                pk__in=expired.values("pk")[:batch_size]
            ).delete()
            if not deleted:
                return total
            total += deleted

    return run


def one_statement(now: datetime) -> int:
    """The floor: one DELETE of everything expired, one transaction (locks it all until done)."""
    deleted, _ = ProcessedEvent.objects.purgeable(now=now).delete()
    return deleted


@dataclass
class Measure:
    strategy: str
    batch_size: int | None
    deleted: int
    seconds: float
    during: list[float]
    before: list[float]

    @property
    def rate(self) -> float:
        return self.deleted / self.seconds


def measure(
    name: str,
    batch_size: int | None,
    purge: Callable[[datetime], int],
    rows: int,
    claim_rate: float,
    baseline: float,
) -> Measure:
    now = timezone.now()
    expected = fill(rows, now)
    connections.close_all()
    ctx = multiprocessing.get_context("fork")
    ready, stop, results = ctx.Event(), ctx.Event(), ctx.Queue()
    process = ctx.Process(target=claimer, args=(claim_rate, ready, stop, results))
    process.start()
    try:
        if not ready.wait(60):
            sys.exit("the claimer did not start")
        time.sleep(baseline)  # claims with no purge running, for comparison
        began = time.monotonic()
        deleted = purge(now)
        ended = time.monotonic()
        time.sleep(0.2)
    finally:
        stop.set()
        samples = results.get(timeout=60)
        process.join(30)
    if process.exitcode:
        sys.exit(f"the claimer failed with exit code {process.exitcode}")
    if deleted != expected:
        sys.exit(f"{name}: deleted {deleted} records, expected {expected}")
    left = ProcessedEvent.objects.exclude(consumer=CLAIMER).count()
    if left != rows - expected:
        sys.exit(f"{name}: {left} records left, expected {rows - expected}")
    during = [seconds for start, seconds in samples if began <= start < ended]
    before = [seconds for start, seconds in samples if start < began]
    return Measure(name, batch_size, deleted, ended - began, during, before)


def explain(batch_size: int, rows: int) -> None:
    """The plan of one purge batch, as the purge issues it."""
    now = timezone.now()
    fill(rows, now)
    first = ProcessedEvent.objects.order_by("pk").values_list("pk", flat=True).first()
    batch = ProcessedEvent.objects.purgeable(now=now).filter(
        pk__gte=first, pk__lt=(first or 0) + batch_size
    )
    compiler = batch.query.get_compiler(connection=connection)
    where, params = compiler.compile(batch.query.where)
    statement = f'DELETE FROM "{TABLE}" WHERE {where}'
    print(f"\nOne batch of {batch_size}:\n\n    {connection.ops.compose_sql(statement, params)}\n")
    sql("BEGIN")
    for (line,) in sql(f"EXPLAIN (ANALYZE, BUFFERS, WAL) {statement}", list(params)):
        print(f"    {line}")
    sql("ROLLBACK")


# --- Storage --------------------------------------------------------------------------------------
def storage(rows: int) -> list[tuple[str, int, int, int, int]]:
    sizes = []
    for shape in SHAPES:
        fill(rows, timezone.now(), shape)
        ((heap, toast, indexes, total),) = sql(
            f"""SELECT pg_relation_size('{TABLE}'),
                       pg_total_relation_size('{TABLE}') - pg_relation_size('{TABLE}')
                         - pg_indexes_size('{TABLE}'),
                       pg_indexes_size('{TABLE}'), pg_total_relation_size('{TABLE}')"""
        )
        sizes.append((shape, int(heap), int(toast), int(indexes), int(total)))
    return sizes


def index_sizes(rows: int) -> list[tuple[str, int]]:
    fill(rows, timezone.now())
    return [
        (str(name), int(size))
        for name, size in sql(
            "SELECT indexrelid::regclass::text, pg_relation_size(indexrelid) FROM pg_index "
            "WHERE indrelid = %s::regclass ORDER BY 1",
            [TABLE],
        )
    ]


# --- Main -----------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run, under a minute")
    parser.add_argument("--rows", type=int, help="records per run (default 1,000,000; quick 100k)")
    parser.add_argument("--runs", type=int, help="runs per cell (default 3; quick 1)")
    parser.add_argument(
        "--batch-sizes", help="comma-separated batch sizes (default 5000,20000,50000; quick 20000)"
    )
    parser.add_argument("--claim-rate", type=float, default=500.0, help="claims/s (default 500)")
    parser.add_argument("--no-reference", action="store_true", help="skip the other strategies")
    parser.add_argument("--explain", action="store_true", help="print one batch's plan")
    runtime.add_arguments(parser)
    args = parser.parse_args()
    if connection.vendor != "postgresql":
        sys.exit("set DATABASE_URL=postgres://... : the benchmark measures PostgreSQL")
    rows = args.rows or (100_000 if args.quick else 1_000_000)
    runs = args.runs or (1 if args.quick else 3)
    default_sizes = "20000" if args.quick else "5000,20000,50000"
    sizes = [int(s) for s in (args.batch_sizes or default_sizes).split(",")]
    baseline = 1.0 if args.quick else 2.0
    call_command("migrate", verbosity=0)

    cells: list[tuple[str, int | None, Callable[[datetime], int]]] = [
        ("batched primary-key ranges (ours)", size, ours(size)) for size in sizes
    ]
    if not args.no_reference:
        cells.append(("one DELETE, one transaction (floor)", None, one_statement))
        if not args.quick:
            cells.append(("pk IN (SELECT ... LIMIT n) batches", 10_000, pk_in_subquery(10_000)))

    results: dict[tuple[str, int | None], list[Measure]] = {}
    for run in range(runs):
        for name, size, purge in cells:
            m = measure(name, size, purge, rows, args.claim_rate, baseline)
            results.setdefault((name, size), []).append(m)
            print(
                f"run {run + 1}/{runs}  {name:<38} {size or '-':>6}  {m.rate:>12,.0f} rows/s  "
                f"claims p99 {percentile(m.during, 0.99) * 1000:6.2f} ms "
                f"(before: {percentile(m.before, 0.99) * 1000:.2f} ms)",
                file=sys.stderr,
                flush=True,
            )

    print()
    print(
        f"{rows:,} records, {rows // 2:,} expired; {runs} run(s) per row; claims of new events "
        f"at {args.claim_rate:.0f}/s in another process; latencies in ms"
    )
    print()
    print(
        "| strategy | batch | rows/s median | min-max | claims during | p50 | p99 | max "
        "| p99 of a run, median | p99 just before |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for (name, size), ms in results.items():
        rates = [m.rate for m in ms]
        during = [s for m in ms for s in m.during]
        before = [s for m in ms for s in m.before]
        print(
            f"| {name} | {size or '-'} | {statistics.median(rates):,.0f} | "
            f"{min(rates):,.0f}-{max(rates):,.0f} | {len(during)} | "
            f"{percentile(during, 0.5) * 1000:.2f} | {percentile(during, 0.99) * 1000:.2f} | "
            f"{max(during, default=float('nan')) * 1000:.2f} | "
            f"{statistics.median(percentile(m.during, 0.99) for m in ms) * 1000:.2f} | "
            f"{percentile(before, 0.99) * 1000:.2f} |"
        )

    if args.explain:
        explain(sizes[0], rows)

    storage_rows = 20_000 if args.quick else 200_000
    print()
    print(f"Storage, {storage_rows:,} records after VACUUM (bytes per record)")
    print()
    print("The options that make a record smaller, measured: [Storage per record](storage.md).")
    print()
    print("| record shape | heap | TOAST | indexes | total | total MiB |")
    print("|---|---:|---:|---:|---:|---:|")
    for shape, heap, toast, indexes, total in storage(storage_rows):
        print(
            f"| {shape} | {heap / storage_rows:.0f} | {toast / storage_rows:.0f} | "
            f"{indexes / storage_rows:.0f} | {total / storage_rows:.0f} | "
            f"{total / 2**20:.1f} |"
        )
    print()
    print("| index (default shape) | bytes per record |")
    print("|---|---:|")
    for name, size in index_sizes(storage_rows):
        print(f"| {name} | {size / storage_rows:.0f} |")
    sql(f"TRUNCATE {TABLE} RESTART IDENTITY")


if __name__ == "__main__":
    main()
