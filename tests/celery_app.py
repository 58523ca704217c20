"""The outbox's Celery app, mocked, for tests that must see what reaches the broker."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from unittest import mock


@contextmanager
def mocked_celery_app() -> Iterator[mock.MagicMock]:
    """One mock for the app both halves of the outbox publish through: the immediate publish
    after a commit (``idempotency.outbox.publish``) and the relay (``idempotency.outbox.relaying``).
    ``app.send_task`` records the publishes."""
    app = mock.MagicMock()
    with (
        mock.patch("idempotency.outbox.publish.current_app", app),
        mock.patch("idempotency.outbox.relaying.current_app", app),
    ):
        yield app
