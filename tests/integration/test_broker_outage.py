"""How long a worker rides out a broker outage, as docs/celery.md states it: Celery's connection
retries with the defaults the example keeps, the operator's log while they last, and the
worker's exit once they run out."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
from celery.worker.consumer.consumer import Consumer
from kombu import Connection
from kombu.exceptions import OperationalError

from project.celery import app
from tests.services import ROOT

DOC = ROOT / "docs" / "celery.md"
#: Nothing listens there: every connection is refused at once.
CLOSED = "amqp://guest:guest@127.0.0.1:1//"


def test_the_example_keeps_celerys_connection_retry_defaults() -> None:
    settings = (ROOT / "project" / "settings.py").read_text()
    for name in ("BROKER_CONNECTION_RETRY", "BROKER_CONNECTION_MAX_RETRIES"):
        assert f"CELERY_{name}" not in settings  # docs/celery.md: "sets none of"
    assert app.conf.broker_connection_retry is True
    assert app.conf.broker_connection_retry_on_startup is None  # falls back to the above
    assert app.conf.broker_connection_max_retries == 100


def test_a_worker_retries_the_broker_for_about_49_minutes(caplog: pytest.LogCaptureFixture) -> None:
    """The worker's own reconnection (Celery's consumer, kombu's schedule), its sleeps counted
    instead of slept."""
    slept: list[float] = []
    consumer = SimpleNamespace(app=app, first_connection_attempt=True)
    conn = Connection(CLOSED)
    refused = ConnectionRefusedError(111, "Connection refused")
    with (
        mock.patch.object(Connection, "_connection_factory", side_effect=refused),
        mock.patch("kombu.utils.functional.sleep", side_effect=slept.append),
        caplog.at_level(logging.ERROR, logger="celery.worker.consumer.consumer"),
        pytest.raises(OperationalError),
    ):
        Consumer.ensure_connected(consumer, conn)  # type: ignore[arg-type]
    # Each wait is slept a second at a time, then the remainder: add them up per attempt.
    total = sum(slept)
    attempts = [r.getMessage() for r in caplog.records if "Cannot connect" in r.getMessage()]
    assert len(attempts) == 100
    # 2 + 4 + ... + 32 = 272 s for the first 16 attempts, then 32 s each for the other 84.
    assert total == pytest.approx(272 + 84 * 32)
    assert round(total / 60) == 49
    assert "Trying again in 2.00 seconds... (1/100)" in attempts[0]
    assert "Trying again in 4.00 seconds... (2/100)" in attempts[1]
    # Celery prints interval / 2 as the count: it stops at 16 while the attempts go on.
    assert "Trying again in 32.00 seconds... (16/100)" in attempts[-1]
    text = " ".join(DOC.read_text().split())
    assert "**about 49 minutes**" in text
    assert "(16/100)" in text
    assert "Trying again in 4.00 seconds... (2/100)" in text


def test_a_worker_whose_broker_retries_run_out_exits_with_status_1(tmp_path: Path) -> None:
    """With one retry instead of 100, so it gives up after 2 s: the CRITICAL line, status 1."""
    (tmp_path / "few_retries.py").write_text(
        "from project.settings import *  # noqa: F403\nCELERY_BROKER_CONNECTION_MAX_RETRIES = 1\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "CELERY_BROKER_URL"}}
    env.update(
        PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]),
        DJANGO_SETTINGS_MODULE="few_retries",
        VAR_DIR=str(tmp_path / "var"),
        CELERY_BROKER_URL=CLOSED,
        CELERY_SKIP_CHECKS="1",
    )
    command = [sys.executable, "-m", "celery", "-A", "project", "worker", "--loglevel=INFO"]
    command += ["--concurrency=1", "--without-gossip", "--without-mingle", "--without-heartbeat"]
    done = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    log = done.stdout + done.stderr
    assert done.returncode == 1, log[-3000:]
    assert re.search(r"Cannot connect to amqp://guest:\*\*@127\.0\.0\.1:1//", log), log[-3000:]
    assert "Trying again in 2.00 seconds... (1/1)" in log
    assert "CRITICAL celery.worker Unrecoverable error: OperationalError(" in log
