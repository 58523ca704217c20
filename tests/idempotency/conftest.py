from __future__ import annotations

from collections.abc import Iterator

import pytest

from idempotency import outbox


@pytest.fixture(autouse=True)
def _closed_breaker() -> Iterator[None]:
    """Every test starts with the outbox's publish breaker closed: one test's broker outage
    must not make the next one skip its publish."""
    outbox.publisher.reset()
    yield
    outbox.publisher.reset()
