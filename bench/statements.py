"""The claim's statement on PostgreSQL, path by path: what each choice costs a first delivery
and a duplicate, the claim alone (no business writes), in one process.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/idempotency_bench python -m bench.statements

Variants, each ``idempotent(consumer, event_id)`` with the library's defaults but for the one
thing changed:

* **adaptive** (the library): the INSERT alone while the consumer's duplicates are rare, the
  INSERT and the SELECT in one round trip while they are frequent;
* **always insert+select**: both statements in one round trip on every claim (the library
  until 0.2);
* **always insert, then select**: the SELECT in a round trip of its own, for duplicates only;
* **duplicate builds the record**: the duplicate's model instance built from its row before the
  stored result is read (the library until 0.2), the statement adaptive.

Each round claims N new events with every variant, then the same events again (duplicates), in
alternating order; the table gives microseconds a claim (median and range over the rounds) and
each variant's time over the library's, taken within each round.
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from bench import runtime

runtime.setup()

from django.core.management import call_command  # noqa: E402
from django.db import connection  # noqa: E402

from idempotency.inbox import claiming, idempotent, statements  # noqa: E402

CONSUMER = "bench.statements"
LIBRARY = "adaptive (the library)"


@contextmanager
def fixed(statement: statements.ClaimStatement) -> Iterator[None]:
    chosen = claiming.claim_statement
    claiming.claim_statement = lambda using: statement
    try:
        yield
    finally:
        claiming.claim_statement = chosen


@contextmanager
def record_built() -> Iterator[None]:
    # A class no loader is an instance of: the duplicate path builds the record, as it did.
    stored = claiming.StoredRecord
    claiming.StoredRecord = type("NeverStored", (), {})  # type: ignore[misc, assignment]
    try:
        yield
    finally:
        claiming.StoredRecord = stored  # type: ignore[misc]


@contextmanager
def library() -> Iterator[None]:
    yield


VARIANTS: dict[str, Callable[[], Any]] = {
    LIBRARY: library,
    "always insert+select": lambda: fixed(statements.insert_select),
    "always insert, then select": lambda: fixed(statements.insert_returning),
    "duplicate builds the record": record_built,
}


def claim_all(ids: list[str]) -> float:
    started = time.perf_counter()
    for event_id in ids:
        with idempotent(CONSUMER, event_id) as claim:
            if claim.duplicate:
                continue
    return (time.perf_counter() - started) / len(ids) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a smoke run")
    parser.add_argument("--events", type=int, help="events per variant and round (default 1000)")
    parser.add_argument("--rounds", type=int, help="rounds (default 9; quick 3)")
    runtime.add_arguments(parser)
    args = parser.parse_args()
    runtime.require_postgresql()
    call_command("migrate", verbosity=0)
    events = args.events or (100 if args.quick else 1000)
    rounds = args.rounds or (3 if args.quick else 9)
    settings = runtime.describe()
    print(
        "Measured with "
        + ", ".join(f"{key} {value}" for key, value in settings.items() if key != "worker")
        + f"; {events} events per variant and round, {rounds} rounds."
    )
    times: dict[tuple[str, str], list[float]] = {}
    started = time.monotonic()
    for round_ in range(rounds):
        order = list(VARIANTS) if round_ % 2 == 0 else list(VARIANTS)[::-1]
        for name in order:
            ids = [str(uuid.uuid4()) for _ in range(events)]
            with VARIANTS[name]():
                statements.forget_duplicate_rates()  # as a new process starts
                times.setdefault((name, "first delivery"), []).append(claim_all(ids))
                times.setdefault((name, "duplicate"), []).append(claim_all(ids))
        with connection.cursor() as cursor:
            cursor.execute(f"TRUNCATE {claiming.ProcessedEvent._meta.db_table}")
    statements.forget_duplicate_rates()
    print(f"({(time.monotonic() - started) / 60:.1f} minutes)")
    print()
    print("| path | variant | µs a claim, median | min-max | / the library's, median | min-max |")
    print("|---|---|---:|---:|---:|---:|")
    for path in ("first delivery", "duplicate"):
        ours = times[(LIBRARY, path)]
        for name in VARIANTS:
            values = times[(name, path)]
            ratios = [v / o for v, o in zip(values, ours, strict=True)]
            print(
                f"| {path} | {name} | {statistics.median(values):,.0f} | "
                f"{min(values):,.0f}-{max(values):,.0f} | {statistics.median(ratios):.2f}x | "
                f"{min(ratios):.2f}-{max(ratios):.2f} |"
            )


if __name__ == "__main__":
    main()
