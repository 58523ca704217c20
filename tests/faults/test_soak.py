"""Scenario 14, the soak: 10,000 events and 10% duplicates through a worker under chaos.

A chaos thread SIGKILLs a random pool process of the worker every 0.5-2 s; once, when about
40% of the events are applied, it restarts the broker, and once, at about 60%, it makes the
database unreachable for ``SOAK_DB_OUTAGE`` seconds (60). Run with ``make soak``, which writes
its rows into the soak section of docs/reliability.md.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections.abc import Callable

import pytest

from tests.faults.brokers import Broker, PrivateRedis
from tests.faults.harness import DatabaseOutage, Scenario, gone
from tests.faults.ledger import DEBIT, PLACE, Events

pytestmark = [pytest.mark.soak, pytest.mark.services]

EVENTS = int(os.environ.get("SOAK_EVENTS", "10000"))
DUPLICATES = EVENTS // 10
OUTAGE = float(os.environ.get("SOAK_DB_OUTAGE", "60"))


class Chaos(threading.Thread):
    """Kills pool processes at random until *until* of the events are applied; restarts the
    broker once on the way, at *restart_at*, and cuts the database off once, at *outage_at*
    (the pool processes go on being killed meanwhile). Reads progress from the hooks' journal,
    so it needs no database connection of its own."""

    def __init__(
        self,
        s: Scenario,
        broker: Broker,
        rng: random.Random,
        total: int,
        outage: DatabaseOutage,
    ) -> None:
        super().__init__(name="chaos", daemon=True)
        self.s, self.broker, self.rng, self.total = s, broker, rng, total
        self.restart_at, self.until = int(total * 0.4), int(total * 0.9)
        self.outage, self.outage_at = outage, int(total * 0.6)
        self.outage_began: float | None = None
        self.outage_seconds = 0.0
        #: Events applied while the database refused connections (must stay 0).
        self.applied_in_outage = 0
        self.frozen = 0
        self.kills = 0
        self.restarts = 0
        self.error: BaseException | None = None
        self.stopping = threading.Event()

    def applied(self) -> int:
        return self.s.count("applied")

    def run(self) -> None:
        try:
            while not self.stopping.is_set():
                done = self.applied()
                if done >= self.until:
                    return
                if not self.restarts and done >= self.restart_at:
                    self.broker.restart()
                    self.restarts += 1
                if self.outage_began is None and done >= self.outage_at:
                    self.outage.begin()
                    self.outage_began = time.monotonic()
                    # A commit journalled just before the cut may still land: then frozen.
                    time.sleep(1)
                    self.frozen = self.applied()
                if self.outage.active:
                    assert self.outage_began is not None
                    self.applied_in_outage = self.applied() - self.frozen
                    if time.monotonic() - self.outage_began >= OUTAGE:
                        self.outage.end()
                        self.outage_seconds = time.monotonic() - self.outage_began
                if self.stopping.wait(self.rng.uniform(0.5, 2.0)):
                    return
                victims = self.s.pool_processes()
                if victims:
                    pid = self.rng.choice(victims)
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        continue
                    self.kills += 1
                    deadline = time.monotonic() + 10
                    while not gone(pid) and time.monotonic() < deadline:
                        time.sleep(0.05)
        except BaseException as exc:
            self.error = exc


def test_soak(scenario: Callable[[str, str], Scenario], broker: Broker) -> None:
    """14. 10,000 events, 10% published twice, random SIGKILLs, one broker restart, one
    database outage."""
    s = scenario(
        "14",
        f"soak: {EVENTS:,} events, 10% duplicates, random kills, broker restart, "
        f"database unreachable {OUTAGE:.0f} s",
    )
    events = Events(seed=14)
    rng = random.Random(14)
    visibility = 30 if isinstance(broker, PrivateRedis) else None
    s.worker(concurrency=2, visibility_timeout=visibility)
    unique = [(PLACE, events.place(), None) for _ in range(EVENTS * 7 // 10)]
    unique += [(DEBIT, events.debit(), None) for _ in range(EVENTS - len(unique))]
    messages = unique + rng.sample(unique, DUPLICATES)
    rng.shuffle(messages)
    s.send_all(messages)
    chaos = Chaos(s, broker, rng, total=len(unique), outage=s.database_outage())
    chaos.start()
    try:
        s.wait(lambda: not chaos.is_alive(), 1800, "the chaos to reach 90% of the events")
    finally:
        chaos.stopping.set()
        chaos.join(timeout=300)
    if chaos.error is not None:
        raise chaos.error
    s.drain(timeout=900)
    s.notes.append(
        f"{chaos.kills} pool processes killed, {chaos.restarts} broker restart, the database "
        f"unreachable for {chaos.outage_seconds:.0f} s ({chaos.outage.terminated} connections "
        f"cut) at 60% of the events"
    )
    s.verify()
    assert chaos.restarts == 1
    assert chaos.outage_seconds >= OUTAGE
    assert chaos.applied_in_outage == 0, "events were applied with the database refusing"
    assert chaos.kills >= 5, f"only {chaos.kills} pool processes were killed"
    assert s.count("received") > len(messages), "no delivery was interrupted"
