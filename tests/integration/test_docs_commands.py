"""The README's and the docs' shell commands, pasted as written, against a live `make run`.

Every ```sh block that talks to the example service (it names http://127.0.0.1:8000) is run in
order, one bash per file so a variable set in one block serves the next, with ``set -e``: the
examples use ``curl -f``, so an answer of 401, 403 or 404 fails the block. The server is
scripts/run.sh (what `make run` runs) on the embedded defaults, in a directory of its own. The
same service also shows that the embedded default keeps up with events as the README says.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.services import ROOT, group_alive, run_sh, wait_for

SERVICE = "http://127.0.0.1:8000"
#: The interpreter running the suite, and its environment's scripts (celery, gunicorn): what
#: run.sh and the documents' commands run on, .venv/bin's in a checkout.
PYTHON = sys.executable
BIN = Path(sys.executable).parent
#: The embedded default keeping up (the README's "Embedded defaults"): EVENTS posted one after
#: another are all applied within APPLIED_AFTER_LAST_POST seconds of the last POST. Measured on
#: 2 shared CPUs (load 2.5-3): 0.1-0.2 s in 5 runs. On kombu's filesystem transport as it comes
#: (`CELERY_BROKER_URL=filesystem://`, `CELERY_EMBEDDED_TRANSPORT=filesystem`), which applies
#: about one event a second, 16 of the 50 were applied after 15 s: it fails.
EVENTS = 50
APPLIED_AFTER_LAST_POST = 15
#: Seconds for the embedded worker to apply the README's events: a payment that arrives before
#: its order is retried with a growing countdown, which a loaded machine stretches.
APPLIED_WITHIN = 300
# The worker's warm shutdown takes a few seconds; a worker stuck on its pool's lock never ends.
STOPPED_WITHIN = 30
BLOCK = re.compile(r"^```sh\n(.*?)^```$", re.MULTILINE | re.DOTALL)
DOCUMENTS = ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in ROOT.glob("docs/*.md"))]


def service_blocks(document: str) -> list[str]:
    return [b for b in BLOCK.findall((ROOT / document).read_text()) if SERVICE in b]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Service:
    def __init__(
        self,
        port: int,
        env: dict[str, str],
        log: Path,
        var: Path,
        process: subprocess.Popen[bytes],
    ) -> None:
        self.port, self.env, self.log, self.var, self.process = port, env, log, var, process

    def run(self, script: str) -> subprocess.CompletedProcess[str]:
        script = script.replace(SERVICE, f"http://127.0.0.1:{self.port}")
        # The documents' interpreter is the one make creates; the suite's is this one (the
        # same in a checkout, the only one in an unpacked sdist).
        script = script.replace(".venv/bin/python", PYTHON)
        return subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )

    def post(self, path: str, token: str, body: object) -> int:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}",
            data=json.dumps(body).encode(),
            headers={"Authorization": f"Token {token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            status: int = response.status
            return status

    def get(self, path: str, token: str) -> tuple[int, dict]:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}", headers={"Authorization": f"Token {token}"}
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, {}


def answers(port: int) -> bool:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/api/", timeout=2)
    except urllib.error.HTTPError as exc:
        return exc.code == 401  # up, and asking for a token
    except OSError:
        return False
    return False


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    var = tmp_path_factory.mktemp("make-run")
    port = free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"DATABASE_URL", "CELERY_BROKER_URL", "DJANGO_SETTINGS_MODULE"}
    }
    env.update(VAR_DIR=str(var), PORT=str(port), HOST="127.0.0.1", BIN=str(BIN),
               PATH=f"{BIN}:" + env.get("PATH", ""))  # fmt: skip
    log = var / "run.log"
    with run_sh(env, log) as process:
        wait_for(
            lambda: process.poll() is not None or answers(port),
            180,
            f"make run's server to answer (log: {log})",
            interval=0.5,
        )
        if process.poll() is not None:
            pytest.fail(f"scripts/run.sh exited:\n{log.read_text()[-3000:]}", pytrace=False)
        yield Service(port, env, log, var, process)


def token(service: Service) -> str:
    done = service.run(
        ".venv/bin/python manage.py drf_create_token admin | cut -d' ' -f3"
    )  # the README's own way (run() names this interpreter)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_the_documents_have_commands_to_run() -> None:
    assert len(service_blocks("README.md")) >= 3
    assert service_blocks("docs/http.md")


def test_the_readme_commands_run_as_written_and_do_what_it_says(service: Service) -> None:
    done = service.run("\n".join(service_blocks("README.md")))
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\n{service.log.read_text()[-3000:]}"
    assert '"status":"accepted"' in done.stdout
    key = token(service)
    # What the README promises once the worker applied its events.
    wait_for(
        lambda: service.get("/api/orders/ORD-2/", key)[1].get("status") == "shipped",
        APPLIED_WITHIN,
        "ORD-2 placed, paid and shipped",
        interval=0.5,
    )
    # ORD-1 took 2 of PROD-A's 100, the order placed with an Idempotency-Key 1 more; ORD-2 one
    # PROD-B of 50; the debit 10.00 of CUST-1's 500.00.
    wait_for(
        lambda: service.get("/api/products/PROD-A/", key)[1].get("stock") == 97,
        APPLIED_WITHIN,
        "PROD-A's stock at 97",
        interval=0.5,
    )
    assert service.get("/api/products/PROD-B/", key)[1]["stock"] == 49
    assert service.get("/api/customers/CUST-1/", key)[1]["balance"] == "490.00"
    assert service.get("/api/orders/ORD-1/", key)[1]["status"] == "accepted"


def test_the_http_guide_commands_run_as_written(service: Service) -> None:
    done = service.run("\n".join(service_blocks("docs/http.md")))
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    # The replayed Location, echoed (after the first body, which ends in no newline); then the
    # outcome polled from it.
    assert re.search(r"}/api/orders/requests/[0-9a-f-]{36}/\n{", done.stdout), done.stdout
    assert '"status":"accepted","reason":"","order":' in done.stdout
    assert "idempotency-key-reused" in done.stdout
    assert done.stdout.endswith("}400\n")  # no key: 400


def test_a_wrong_token_fails_the_commands(service: Service) -> None:
    """The check can fail: the same README block with a token that is not one stops at a 401."""
    block = service_blocks("README.md")[0].replace(
        "TOKEN=$(.venv/bin/python manage.py drf_create_token admin | cut -d' ' -f3)",
        "TOKEN=not-a-token",
    )
    done = service.run(block)
    assert done.returncode != 0
    assert "401" in done.stderr


def test_the_embedded_default_keeps_up_with_the_events_posted(service: Service) -> None:
    """50 events posted to `make run`'s service (SQLite, the embedded broker) are all applied
    within seconds of the last POST, not at kombu's filesystem transport's one a second."""
    key = token(service)

    def place(order: str, event_id: str) -> None:
        status = service.post("/api/events/", key, {
            "eventType": "PlaceOrder", "eventId": event_id, "timestamp": "2023-10-27T10:00:00Z",
            "orderId": order, "customerId": "CUST-1",
            "items": [{"productId": "PROD-A", "quantity": 1}],
        })  # fmt: skip
        assert status == 202

    def applied(ids: list[str]) -> int:
        # The inbox as the worker wrote it: one record per event applied.
        database = f"file:{service.var / 'db.sqlite3'}?mode=ro"
        with contextlib.closing(sqlite3.connect(database, uri=True, timeout=20)) as db:
            (count,) = db.execute(
                "SELECT count(*) FROM idempotency_processedevent WHERE consumer = ? AND event_id"
                f" IN ({', '.join('?' * len(ids))})",
                ["orders.tasks.place_order", *ids],
            ).fetchone()
        return int(count)

    # The worker up and consuming (it may still be starting when the server answers): the
    # measure is of keeping up, not of starting.
    warm_up = str(uuid.uuid4())
    place("ORD-PACE-FIRST", warm_up)
    wait_for(lambda: applied([warm_up]) == 1, 120, "the worker to apply a first event")
    ids = [str(uuid.uuid4()) for _ in range(EVENTS)]
    for n, event_id in enumerate(ids):
        place(f"ORD-PACE-{n}", event_id)
    posted = time.monotonic()
    while (done := applied(ids)) < EVENTS and time.monotonic() - posted < APPLIED_AFTER_LAST_POST:
        time.sleep(0.1)
    lag = time.monotonic() - posted
    assert done == EVENTS, (
        f"{done} of {EVENTS} events applied {lag:.1f} s after the last POST (log: {service.log}):\n"
        f"{service.log.read_text()[-3000:]}"
    )
    print(f"{EVENTS} events applied {lag:.1f} s after the last POST")


def test_a_term_to_the_script_stops_everything_it_started(service: Service) -> None:
    """Stopping `make run` as a supervisor does (SIGTERM to the script alone) ends the server,
    the relay and the worker with its pool children, in seconds: the script's trap runs at once
    (the development server is not a foreground job it would wait for), and it signals the
    worker's main process alone. Last in this module: it stops the module's service."""
    os.kill(service.process.pid, signal.SIGTERM)
    wait_for(
        lambda: not group_alive(service.process),
        STOPPED_WITHIN,
        f"every process of scripts/run.sh to exit (log: {service.log})",
        interval=0.2,
    )
    assert service.process.returncode is not None
