"""Two workers claiming the same event at once, on real parallel PostgreSQL connections.

The first claimant holds its transaction open; the second must block on the unique index (seen
in ``pg_stat_activity``, not guessed with a sleep), then discard if the first commits, or
process the event if the first rolls back.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from idempotency import inbox, statements
from idempotency.inbox import idempotent
from idempotency.models import ProcessedEvent
from tests.services import in_thread, lock_waiters, require_postgres, wait_for

pytestmark = [pytest.mark.services, pytest.mark.django_db(transaction=True)]

TIMEOUT = 20


class Rollback(Exception):
    pass


@pytest.fixture(params=sorted(statements.STATEMENTS))
def statement(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    require_postgres()
    chosen = statements.STATEMENTS[request.param]
    monkeypatch.setattr(inbox, "claim_statement", lambda using: chosen)
    return str(request.param)


@pytest.fixture
def race() -> Iterator[Callable[[bool], dict[str, Any]]]:
    threads: list[threading.Thread] = []

    def run(first_commits: bool) -> dict[str, Any]:
        claimed, release = threading.Event(), threading.Event()
        outcome: dict[str, Any] = {"first_ran": 0, "second_ran": 0}
        errors: list[BaseException] = []

        def first() -> None:
            try:
                with idempotent("race", "e-1") as claim:
                    assert not claim.duplicate
                    outcome["first_ran"] += 1
                    claimed.set()
                    assert release.wait(TIMEOUT), "never released"
                    if not first_commits:
                        raise Rollback
            except Rollback:
                pass

        def second() -> None:
            with idempotent("race", "e-1") as claim:
                outcome["second_duplicate"] = claim.duplicate
                if not claim.duplicate:
                    outcome["second_ran"] += 1

        threads.append(in_thread(first, errors))
        assert claimed.wait(TIMEOUT), f"the first claim did not happen: {errors}"
        threads.append(in_thread(second, errors))
        wait_for(lambda: lock_waiters() >= 1, TIMEOUT, "the second claim to block on the lock")
        assert threads[-1].is_alive(), "the second claim did not wait for the first"
        release.set()
        for thread in threads:
            thread.join(TIMEOUT)
            assert not thread.is_alive(), "a claimant hung"
        assert not errors, errors
        return outcome

    yield run
    for thread in threads:
        thread.join(TIMEOUT)


@pytest.mark.parametrize("attempt", range(5))
def test_the_second_claimant_waits_then_discards(
    statement: str, race: Callable[[bool], dict[str, Any]], attempt: int
) -> None:
    outcome = race(True)
    assert outcome == {"first_ran": 1, "second_ran": 0, "second_duplicate": True}
    assert ProcessedEvent.objects.count() == 1


@pytest.mark.parametrize("attempt", range(5))
def test_the_second_claimant_processes_when_the_first_rolls_back(
    statement: str, race: Callable[[bool], dict[str, Any]], attempt: int
) -> None:
    outcome = race(False)
    assert outcome == {"first_ran": 1, "second_ran": 1, "second_duplicate": False}
    assert ProcessedEvent.objects.count() == 1
