"""Steady state: an hour of claims and scheduled purges, compressed into minutes.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/idempotency_bench python -m bench.steady
    ... python -m bench.steady --quick        # half a minute

One process claims new events at a constant rate (default 200/s) for N minutes (5; quick 0.5),
each claim as ``@idempotent_task`` makes it, in its own transaction. Meanwhile this process
runs the scheduled purge, the ``purge_processed_events`` task, every P seconds (30; quick 5)
with a retention of 2P, so records expire all through the run, and samples the inbox's heap
and index sizes every second. In a live inbox the purge runs daily with 30 days' retention;
the ratio of retention to purge interval and the number of purges per run are what is kept.

The purge's DELETEs only mark rows dead; the space comes back when VACUUM reclaims them, which
autovacuum does once a table's dead rows pass 50 + 20% of its live ones (the defaults), looking
every minute (``autovacuum_naptime``), a day's purge being followed by some 1,400 looks. That
cannot be compressed, so ``--vacuum`` says who vacuums:

* ``emulated`` (the default): this process is autovacuum at a compressed naptime, running the
  ``VACUUM`` autovacuum would, at its default threshold, checked every second;
* ``server``: the server's autovacuum, uncompressed (off on some machines: see the header);
* ``none``: nobody, to show what happens to an inbox whose autovacuum is off.

It reports whether the sizes stop growing (the inbox's size just before each purge, over the
last third of the run, within 5% of its value at the start of that third) and the claim p99
while each purge ran (target: under 5 ms), and draws the sizes and the latencies over time.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
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
from django.db import connections  # noqa: E402
from django.test.utils import override_settings  # noqa: E402

from bench.database import percentile, sql  # noqa: E402
from idempotency.inbox import idempotent  # noqa: E402
from idempotency.models import ProcessedEvent  # noqa: E402
from idempotency.tasks import purge_processed_events  # noqa: E402

TABLE = ProcessedEvent._meta.db_table
CONSUMER = "orders.tasks.place_order"
FLAT = 0.05  # sizes over the last third of the run within 5%
P99_TARGET_MS = 5.0


def claimer(rate: float, seconds: float, ready, go, results) -> None:  # type: ignore[no-untyped-def]
    """Claim new events at *rate* per second for *seconds*; report (start, seconds) each."""
    connections.close_all()

    def claim_one() -> None:
        event_id = str(uuid.uuid4())
        event = {"eventId": event_id, "orderId": f"ORD-{event_id[:8]}"}
        with idempotent(CONSUMER, event_id, payload=event) as claim:
            claim.result = {"orderId": event["orderId"], "status": "accepted", "reason": ""}

    for _ in range(50):  # connect and warm up
        claim_one()
    ready.set()
    go.wait()
    samples: list[tuple[float, float]] = []
    interval = 1 / rate
    began = time.monotonic()
    next_at = began
    while next_at < began + seconds:
        start = time.monotonic()
        claim_one()
        samples.append((start, time.monotonic() - start))
        # A constant schedule: a late claim does not push the next ones back.
        next_at += interval
        time.sleep(max(0.0, next_at - time.monotonic()))
    results.put(samples)
    connections.close_all()


def autovacuum_due(sample: dict[str, int]) -> bool:
    """Autovacuum's trigger with the default settings: dead rows > 50 + 20% of the live ones."""
    return sample["dead"] > 50 + 0.2 * sample["rows"]


def sizes() -> dict[str, int]:
    """The inbox's heap and index bytes, its records, and the dead rows autovacuum has yet to
    reclaim (with how many times it has run on the table)."""
    ((heap, indexes, rows, dead, vacuums),) = sql(
        f"""SELECT pg_relation_size('{TABLE}'), pg_indexes_size('{TABLE}'),
                   (SELECT count(*) FROM {TABLE}), n_dead_tup, autovacuum_count
            FROM pg_stat_user_tables WHERE relid = '{TABLE}'::regclass"""
    )
    return {
        "heap": int(heap),
        "indexes": int(indexes),
        "rows": int(rows),
        "dead": int(dead),
        "autovacuums": int(vacuums),
    }


def prior(samples: list[dict[str, Any]], purge: dict[str, Any]) -> dict[str, Any]:
    """The last sample taken before *purge* began."""
    return next((s for s in reversed(samples) if s["t"] < purge["start"]), samples[0])


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    t = [s["t"] for s in report["samples"]]
    top.plot(t, [s["heap"] / 2**20 for s in report["samples"]], label="heap")
    top.plot(t, [s["indexes"] / 2**20 for s in report["samples"]], label="indexes")
    top.set_ylabel("MiB")
    rows = top.twinx()
    rows.plot(t, [s["rows"] for s in report["samples"]], color="grey", linestyle=":", label="rows")
    rows.set_ylabel("records")
    for vacuum in report["vacuums"]:
        top.axvline(vacuum["start"], color="green", alpha=0.3, linewidth=0.8)
    top.legend(loc="upper left")
    rows.legend(loc="lower right")
    top.set_title(
        f"Claims at {report['rate']:.0f}/s, the scheduled purge every {report['interval']:.0f} s "
        f"(retention {report['retention']:.0f} s); VACUUM {report['vacuum']} (green)"
    )
    bottom.plot(
        [c[0] for c in report["claims"]],
        [c[1] * 1000 for c in report["claims"]],
        ".",
        markersize=1.5,
        label="claim latency",
    )
    for purge in report["purges"]:
        bottom.axvspan(
            purge["start"], max(purge["end"], purge["start"] + 0.3), color="red", alpha=0.3
        )
    bottom.axhline(P99_TARGET_MS, color="red", linestyle="--", linewidth=0.8, label="5 ms")
    bottom.set_yscale("log")
    bottom.set_ylabel("ms (log)")
    bottom.set_xlabel("seconds (red: a purge running)")
    bottom.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="half a minute, a purge every 5 s")
    parser.add_argument("--minutes", type=float, help="length of the run (default 5; quick 0.5)")
    parser.add_argument("--rate", type=float, default=200.0, help="claims/s (default 200)")
    parser.add_argument("--interval", type=float, help="seconds between purges (30; quick 5)")
    parser.add_argument(
        "--vacuum",
        choices=["emulated", "server", "none"],
        default="emulated",
        help="who vacuums the inbox (default: this process, as autovacuum would)",
    )
    parser.add_argument("--plot", type=Path, help="write the plot here (PNG)")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    runtime.add_arguments(parser)
    args = parser.parse_args()
    runtime.require_postgresql()
    if settings.DEBUG:
        sys.exit("DEBUG is on: Django would record every query; unset DJANGO_DEBUG")
    seconds = 60 * (args.minutes or (0.5 if args.quick else 5))
    interval = args.interval or (5.0 if args.quick else 30.0)
    retention = 2 * interval
    call_command("migrate", verbosity=0)
    measured_with = runtime.describe()
    sql(f"TRUNCATE {TABLE} RESTART IDENTITY")
    sql(f"VACUUM {TABLE}")
    (server_autovacuum,) = sql("SHOW autovacuum")[0]
    if args.vacuum == "server" and server_autovacuum != "on":
        sys.exit("--vacuum server, but the server's autovacuum is off")
    if args.vacuum != "server":
        # Left to the server's, autovacuum could vacuum the table in the middle of a cycle.
        sql(f"ALTER TABLE {TABLE} SET (autovacuum_enabled = false)")

    connections.close_all()
    ctx = multiprocessing.get_context("fork")
    ready, go, results = ctx.Event(), ctx.Event(), ctx.Queue()
    process = ctx.Process(target=claimer, args=(args.rate, seconds, ready, go, results))
    process.start()
    if not ready.wait(60):
        sys.exit("the claimer did not start")
    samples: list[dict[str, Any]] = []
    purges: list[dict[str, Any]] = []
    vacuums: list[dict[str, Any]] = []
    live = {**settings.IDEMPOTENCY, "RETENTION": timedelta(seconds=retention)}
    with override_settings(IDEMPOTENCY=live):
        purge_processed_events()  # warm up (imports, statements): the table is empty
        go.set()
        began = time.monotonic()
        next_purge = began + interval
        while time.monotonic() < began + seconds:
            now = time.monotonic()
            if now >= next_purge:
                start = time.monotonic()
                deleted = purge_processed_events()
                end = time.monotonic()
                purges.append({"start": start - began, "end": end - began, "deleted": deleted})
                print(
                    f"{start - began:6.1f} s  purged {deleted:,} in {(end - start) * 1000:.0f} ms",
                    file=sys.stderr,
                    flush=True,
                )
                next_purge += interval
            sample = {"t": time.monotonic() - began, **sizes()}
            samples.append(sample)
            if args.vacuum == "emulated" and autovacuum_due(sample):
                start = time.monotonic()
                sql(f"VACUUM {TABLE}")
                vacuums.append({"start": start - began, "end": time.monotonic() - began})
            time.sleep(max(0.0, min(1.0, next_purge - time.monotonic())))
    claims = [(start - began, took) for start, took in results.get(timeout=120)]
    process.join(30)
    if process.exitcode:
        sys.exit(f"the claimer failed with exit code {process.exitcode}")

    # Per purge, the claims whose transaction overlapped it.
    for purge in purges:
        during = [t for s, t in claims if s < purge["end"] and s + t > purge["start"]]
        purge["claims"] = len(during)
        purge["max_ms"] = max(during, default=float("nan")) * 1000
        purge["p99_ms"] = percentile(during, 0.99) * 1000
    outside = [t for s, t in claims if not any(s < p["end"] and s + t > p["start"] for p in purges)]
    # The inbox's size just before each purge: the same point of each cycle, so the sawtooth
    # of deletes and refills does not read as growth.
    before = [prior(samples, p) for p in purges]
    third = before[len(before) * 2 // 3 :] or before[-1:]
    base = third[0]["heap"] + third[0]["indexes"]
    growth = max(s["heap"] + s["indexes"] for s in third) / base - 1 if base else float("nan")
    achieved = len(claims) / seconds
    report = {
        "rate": args.rate,
        "achieved_rate": achieved,
        "seconds": seconds,
        "interval": interval,
        "retention": retention,
        "samples": samples,
        "purges": purges,
        "vacuums": vacuums,
        "vacuum": args.vacuum,
        "settings": measured_with,
        "claims": claims,
        "growth_last_third": growth,
        "p99_outside_ms": percentile(outside, 0.99) * 1000,
    }

    print(
        f"Claims of new events at {args.rate:.0f}/s (achieved {achieved:.0f}/s) in one process "
        f"for {seconds:.0f} s; the scheduled purge (`purge_processed_events`) every "
        f"{interval:.0f} s with a retention of {retention:.0f} s: {len(purges)} purges. "
        "Measured with "
        + ", ".join(f"{k} {v}" for k, v in measured_with.items() if k not in ("CPU", "Python"))
        + f". VACUUM: {args.vacuum} "
        f"(the server's autovacuum is {server_autovacuum}); {len(vacuums)} emulated "
        "autovacuum run(s)."
    )
    print()
    print(
        "| purge | at (s) | deleted | ms | rows after | heap MiB before | indexes MiB before "
        "| dead rows before | vacuums so far | claims during | their max (ms) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n, purge in enumerate(purges, 1):
        last = prior(samples, purge)
        after = next((s for s in samples if s["t"] >= purge["end"]), samples[-1])
        print(
            f"| {n} | {purge['start']:.0f} | {purge['deleted']:,} | "
            f"{(purge['end'] - purge['start']) * 1000:.0f} | {after['rows']:,} | "
            f"{last['heap'] / 2**20:.2f} | {last['indexes'] / 2**20:.2f} | {last['dead']:,} | "
            f"{last['autovacuums'] + sum(v['start'] < purge['start'] for v in vacuums)} | "
            f"{purge['claims']} | "
            f"{purge['max_ms']:.2f} |"
        )
    during_all = [p["max_ms"] for p in purges if p["claims"]]
    worst = max(during_all, default=float("nan"))
    print()
    print("| target | measured | met |")
    print("|---|---:|:---:|")
    print(
        f"| inbox size (heap + indexes) before a purge, over the last third of the run, "
        f"within {FLAT * 100:.0f}% | {growth * 100:+.1f}% | {'yes' if growth <= FLAT else 'no'} |"
    )
    print(
        f"| slowest claim overlapping any purge < {P99_TARGET_MS:g} ms | {worst:.2f} ms | "
        f"{'yes' if worst < P99_TARGET_MS else 'no'} |"
    )
    print(
        f"| (for comparison) claim p99 outside the purges | {report['p99_outside_ms']:.2f} ms | |"
    )
    if args.vacuum != "server":
        sql(f"ALTER TABLE {TABLE} RESET (autovacuum_enabled)")
    if args.plot:
        plot(report, args.plot)
    if args.json:
        args.json.write_text(json.dumps(report))


if __name__ == "__main__":
    main()
