"""pytest fixtures of ``idempotency.testing``, registered through the ``pytest11`` entry point.

* ``deliver_concurrently``: ``deliver_concurrently(handler, event, times=2)``, on a
  transactional database (it requests ``transactional_db``: the racing connections must see
  committed data);
* ``deliver_after_crash``: ``deliver_after_crash(handler, event)``, with ``db`` or
  ``transactional_db``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from idempotency import testing


@pytest.fixture
def deliver_concurrently(transactional_db: Any) -> Callable[..., testing.Deliveries]:
    return testing.deliver_concurrently


@pytest.fixture
def deliver_after_crash() -> Callable[..., testing.Deliveries]:
    return testing.deliver_after_crash
