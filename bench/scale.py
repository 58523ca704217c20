"""Does a claim cost the same in an inbox of 10 thousand records as in one of 10 million?

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/idempotency_bench python -m bench.scale
    ... python -m bench.scale --quick          # 10k and 100k records only

The inbox is filled once and grown in place (10k, 100k, 1M, 10M records) with
:mod:`bench.fill`, in the default record shape, ids in processed_at order as claims leave
them. At each size, one process measures:

* first-time claims of new events, as ``@idempotent_task`` makes them (the payload's
  fingerprint, the task's result stored), each in its own transaction;
* duplicates of events already in the table, picked at random across all of it (not only the
  recent, cached ones), with the library's defaults (a duplicate writes nothing);
* the scheduled purge deleting a fixed number of the oldest records (``purge(now=...)``, the
  default batch size), three times: its cost should follow what it deletes, not the table;
  then the VACUUM that reclaims those rows (with ``INDEX_CLEANUP ON``, as a VACUUM after a
  large purge runs), whose cost does follow the table: it reads every B-tree index whole.

Claims run in blocks, first-time and duplicate blocks alternating; throughput is the median of
the blocks' rates, latencies are percentiles over every claim of the path at that size. Runs
with DEBUG off and the library's defaults.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

from bench import runtime

runtime.setup()  # bench/settings.py: DEBUG off, the library's defaults

from django.conf import settings  # noqa: E402
from django.core.management import call_command  # noqa: E402
from django.db import transaction  # noqa: E402
from django.utils import timezone  # noqa: E402

from bench.database import percentile, sql  # noqa: E402
from bench.fill import TABLE, fill, insert_statement  # noqa: E402
from idempotency.conf import app_settings  # noqa: E402
from idempotency.inbox import idempotent  # noqa: E402
from idempotency.models import ProcessedEvent  # noqa: E402

CONSUMER = "bench.scale"  # apart from the filled consumers, so duplicates are picked from the fill
FULL_SIZES = [10_000, 100_000, 1_000_000, 10_000_000]
QUICK_SIZES = [10_000, 100_000]
TOLERANCE = 0.10  # target 4: within 10% from the smallest size to the largest


def first_time(event_id: str) -> None:
    event = {"eventId": event_id, "orderId": f"ORD-{event_id[:8]}"}
    with idempotent(CONSUMER, event_id, payload=event) as claim:
        if not claim.duplicate:
            claim.result = {"orderId": event["orderId"], "status": "accepted", "reason": ""}


def duplicate(key: tuple[str, str]) -> None:
    with idempotent(key[0], key[1]) as claim:
        if not claim.duplicate:
            sys.exit(f"{key} was expected to be a duplicate")


def random_keys(count: int) -> list[tuple[str, str]]:
    """*count* (consumer, event id) pairs of filled records, uniformly across the table."""
    ((low, high),) = sql(f"SELECT min(id), max(id) FROM {TABLE}")
    keys: list[tuple[str, str]] = []
    while len(keys) < count:
        ids = [random.randint(low, high) for _ in range(2 * (count - len(keys)))]
        keys += sql(
            f"SELECT consumer, event_id FROM {TABLE} WHERE id = ANY(%s) AND consumer <> %s",
            [ids, "bench.scale"],
        )
    random.shuffle(keys)
    return keys[:count]


def sizes() -> dict[str, int]:
    rows = sql(
        "SELECT indexrelid::regclass::text, pg_relation_size(indexrelid) FROM pg_index "
        "WHERE indrelid = %s::regclass ORDER BY 1",
        [TABLE],
    )
    ((heap, total),) = sql(f"SELECT pg_relation_size('{TABLE}'), pg_total_relation_size('{TABLE}')")
    return {"heap": int(heap), "total": int(total), **{str(n): int(s) for n, s in rows}}


def wal_per_insert(count: int, start: int) -> dict[str, float]:
    """The WAL one new record's INSERT writes, full-page images included, as PostgreSQL
    accounts it for that statement alone (the server is shared: its WAL position is not ours).

    Measured after the claims: a B-tree page changed for the first time since the last
    checkpoint is written whole to the WAL, and a random event id lands on a random leaf of the
    unique index, so the larger the index the more of its inserts pay for a full page.
    """
    now = timezone.now()
    statement, params = insert_statement(1, start, now, now)
    records = fpi = wal = read = written = 0
    with transaction.atomic():
        for _ in range(count):
            # The same record number each time: only its event id (random) must differ.
            rows = sql(f"EXPLAIN (ANALYZE, BUFFERS, WAL, FORMAT JSON) {statement}", params)
            plan = rows[0][0]
            plan = (json.loads(plan) if isinstance(plan, str) else plan)[0]["Plan"]
            records += plan.get("WAL Records", 0)
            fpi += plan.get("WAL FPI", 0)
            wal += plan.get("WAL Bytes", 0)
            # Pages not in shared_buffers, and dirty pages this backend had to write out to
            # make room for them: what an index larger than shared_buffers costs an insert.
            read += plan.get("Shared Read Blocks", 0)
            written += plan.get("Shared Written Blocks", 0)
        transaction.set_rollback(True)
    return {
        "bytes": wal / count,
        "fpi": fpi / count,
        "records": records / count,
        "read": read / count,
        "written": written / count,
    }


def measure_claims(size: int, blocks: int, per_block: int) -> dict[str, dict[str, Any]]:
    keys = random_keys(blocks * per_block + per_block)
    for key in keys[:per_block]:  # warm the connection and the statement path
        duplicate(key)
    for _ in range(per_block // 4):
        first_time(str(uuid.uuid4()))
    dup_keys = iter(keys[per_block:])
    paths: dict[str, dict[str, list[float]]] = {
        "first-time": {"rates": [], "latencies": []},
        "duplicate": {"rates": [], "latencies": []},
    }
    for block in range(blocks):
        order = ["first-time", "duplicate"] if block % 2 == 0 else ["duplicate", "first-time"]
        for path in order:
            latencies = paths[path]["latencies"]
            began = time.perf_counter()
            for _ in range(per_block):
                start = time.perf_counter()
                if path == "first-time":
                    first_time(str(uuid.uuid4()))
                else:
                    duplicate(next(dup_keys))
                latencies.append(time.perf_counter() - start)
            paths[path]["rates"].append(per_block / (time.perf_counter() - began))
    result = {}
    for path, m in paths.items():
        result[path] = {
            "rate": statistics.median(m["rates"]),
            "rates": m["rates"],
            "p50_ms": percentile(m["latencies"], 0.5) * 1000,
            "p99_ms": percentile(m["latencies"], 0.99) * 1000,
        }
        print(
            f"  {size:>12,}  {path:<10} {result[path]['rate']:8,.0f} claims/s  "
            f"p50 {result[path]['p50_ms']:.2f} ms  p99 {result[path]['p99_ms']:.2f} ms",
            file=sys.stderr,
            flush=True,
        )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="10k and 100k records only")
    parser.add_argument("--sizes", help="comma-separated inbox sizes (default 10k,100k,1M,10M)")
    parser.add_argument("--blocks", type=int, help="blocks per path and size (default 6; quick 2)")
    parser.add_argument("--per-block", type=int, default=400, help="claims per block (400)")
    parser.add_argument("--purged", type=int, default=2_000, help="records per purge (2,000)")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    runtime.add_arguments(parser)
    args = parser.parse_args()
    runtime.require_postgresql()
    if settings.DEBUG:
        sys.exit("DEBUG is on: Django would record every query; unset DJANGO_DEBUG")
    targets = (
        [int(s) for s in args.sizes.split(",")]
        if args.sizes
        else (QUICK_SIZES if args.quick else FULL_SIZES)
    )
    blocks = args.blocks or (2 if args.quick else 6)
    purges = 3
    call_command("migrate", verbosity=0)
    measured_with = runtime.describe()
    sql(f"TRUNCATE {TABLE} RESTART IDENTITY")
    # Warm the process up before the first size (imports, caches, the connection): otherwise
    # the smallest size, measured first, pays for it and flatters every larger one.
    for _ in range(1000):
        first_time(str(uuid.uuid4()))
    for key in sql(f"SELECT consumer, event_id FROM {TABLE}"):
        duplicate(key)
    sql(f"TRUNCATE {TABLE} RESTART IDENTITY")

    # One timeline for the whole run: record g of the fill is processed at origin + g * step,
    # the largest size spanning the retention window, so ids follow processed_at throughout and
    # the oldest records are always the lowest ids, as in a live inbox. The window ends now:
    # each purge passes its own "now", a moment in the past.
    retention = app_settings.RETENTION or timedelta(days=30)
    step = retention / max(targets)
    origin = timezone.now() - retention
    next_g = 1  # the next record of the timeline to fill
    oldest_g = 1  # the oldest record of the timeline not yet purged
    results: list[dict[str, Any]] = []
    started = time.monotonic()
    for size in targets:
        count = sql(f"SELECT count(*) FROM {TABLE}")[0][0]
        began = time.monotonic()
        if size > count:
            add = size - count
            fill(
                add,
                start=next_g,
                first_at=origin + next_g * step,
                last_at=origin + (next_g + add - 1) * step,
            )
            next_g += add
        sql("CHECKPOINT")
        filled = time.monotonic() - began
        print(f"{size:,} records ({filled:.0f} s to fill)", file=sys.stderr, flush=True)
        table = sizes()
        claims = measure_claims(size, blocks, args.per_block)
        wal = wal_per_insert(200, next_g)
        print(
            f"  an INSERT: {wal['bytes']:,.0f} bytes of WAL, {wal['fpi']:.2f} full pages, "
            f"{wal['read']:.2f} pages read, {wal['written']:.2f} written",
            file=sys.stderr,
            flush=True,
        )
        purge_seconds = []
        for _ in range(purges):
            # "now" such that exactly the *purged* oldest records are past the retention.
            cutoff = origin + (oldest_g + args.purged - 0.5) * step
            begin = time.perf_counter()
            deleted = ProcessedEvent.objects.purge(now=cutoff + retention)
            purge_seconds.append(time.perf_counter() - begin)
            if deleted != args.purged:
                sys.exit(f"the purge deleted {deleted:,} records, expected {args.purged:,}")
            oldest_g += args.purged
        purge = statistics.median(purge_seconds)
        # The DELETE only marks the rows; the VACUUM that reclaims them (autovacuum's, in
        # production) reads each B-tree index whole, so its cost follows the table's size.
        # INDEX_CLEANUP ON: below 2% of the heap's pages PostgreSQL would skip the indexes,
        # which a daily purge of a seventh of the inbox never is.
        begin = time.perf_counter()
        sql(f"VACUUM (INDEX_CLEANUP ON) {TABLE}")
        vacuum = time.perf_counter() - begin
        print(
            f"  purge of {args.purged:,}: {purge * 1000:.1f} ms "
            f"({purge / args.purged * 1e6:.1f} µs a record); the VACUUM after "
            f"{purges * args.purged:,} deleted: {vacuum * 1000:.0f} ms",
            file=sys.stderr,
            flush=True,
        )
        results.append(
            {
                "size": size,
                "sizes": table,
                "claims": claims,
                "purge_seconds": purge_seconds,
                "vacuum_seconds": vacuum,
                "wal": wal,
                "fill_seconds": filled,
            }
        )
    elapsed = time.monotonic() - started

    first, last = results[0], results[-1]
    print(
        f"One process; {blocks} blocks of {args.per_block} claims per path and size, "
        f"alternating; purges of {args.purged:,} records (batch size "
        f"{app_settings.PURGE_BATCH_SIZE:,}), median of {purges}; a CHECKPOINT before each "
        f"size; {elapsed / 60:.1f} minutes. Measured with "
        + ", ".join(f"{k} {v}" for k, v in measured_with.items() if k not in ("CPU", "Python"))
        + "."
    )
    print()
    print(
        "| records | first-time claims/s | p50 | p99 | duplicates/s | p50 | p99 "
        f"| purge of {args.purged:,} (ms) | µs a record purged "
        f"| VACUUM after {purges * args.purged:,} purged (ms) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        f, d = r["claims"]["first-time"], r["claims"]["duplicate"]
        purge = statistics.median(r["purge_seconds"])
        print(
            f"| {r['size']:,} | {f['rate']:,.0f} | {f['p50_ms']:.2f} | {f['p99_ms']:.2f} | "
            f"{d['rate']:,.0f} | {d['p50_ms']:.2f} | {d['p99_ms']:.2f} | {purge * 1000:.1f} | "
            f"{purge / args.purged * 1e6:.1f} | {r['vacuum_seconds'] * 1000:,.0f} |"
        )
    print()
    index_names = [k for k in first["sizes"] if k not in ("heap", "total")]
    print(
        "| records | heap MiB | "
        + " | ".join(f"{n} MiB" for n in index_names)
        + " | total MiB | bytes a record | an INSERT: WAL bytes | full pages | pages read "
        "| pages written |"
    )
    print("|---:|---:|" + "---:|" * len(index_names) + "---:|---:|---:|---:|---:|---:|")
    for r in results:
        s = r["sizes"]
        print(
            f"| {r['size']:,} | {s['heap'] / 2**20:,.1f} | "
            + " | ".join(f"{s.get(n, 0) / 2**20:,.1f}" for n in index_names)
            + f" | {s['total'] / 2**20:,.1f} | {s['total'] / r['size']:.0f} | "
            f"{r['wal']['bytes']:,.0f} | {r['wal']['fpi']:.2f} | {r['wal']['read']:.2f} | "
            f"{r['wal']['written']:.2f} |"
        )
    print()
    print(f"| from {first['size']:,} to {last['size']:,} records | change | within 10% |")
    print("|---|---:|:---:|")
    checks = []
    for path in ("first-time", "duplicate"):
        a, b = first["claims"][path], last["claims"][path]
        checks.append((f"{path} throughput", b["rate"] / a["rate"] - 1, True))
        checks.append((f"{path} p99", b["p99_ms"] / a["p99_ms"] - 1, False))
    for what, change, higher_is_better in checks:
        met = change >= -TOLERANCE if higher_is_better else change <= TOLERANCE
        print(f"| {what} | {change * 100:+.0f}% | {'yes' if met else 'no'} |")
    if args.json:
        args.json.write_text(
            json.dumps(
                {"results": results, "purged": args.purged, "settings": measured_with}, indent=1
            )
        )


if __name__ == "__main__":
    main()
