"""``make run`` on PostgreSQL: scripts/run.sh itself (not a copy of its gunicorn command) serves
the API through gunicorn, and the web processes hold a bounded pool of connections."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import Permission
from django.db import connection
from rest_framework.authtoken.models import Token

from tests.factories import UserFactory, place_order_event
from tests.integration.test_web_server import Server, free_port
from tests.services import database_url, require_postgres, run_sh, wait_for

pytestmark = [pytest.mark.services, pytest.mark.django_db(transaction=True)]

WEB_WORKERS, WEB_THREADS = 2, 2
BIN = Path(sys.executable).parent
CLIENTS, EVENTS_EACH = 16, 5
ESTABLISHED = "01"


def session_processes(session: int) -> dict[int, str]:
    """The processes of *session* (run.sh's), by pid, with their command lines."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue  # gone meanwhile
        # The fields after the command's name (in parentheses): state, ppid, pgrp, session.
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[3]) == session:
            found[int(entry.name)] = cmdline
    return found


def connections_to(pid: int, port: int) -> set[str]:
    """The sockets (by inode) of process *pid* with an established TCP connection to *port* (the
    database's), from /proc."""
    try:
        inodes = {
            os.readlink(fd)[len("socket:[") : -1]
            for fd in Path(f"/proc/{pid}/fd").iterdir()
            if os.readlink(fd).startswith("socket:[")
        }
        tables = [Path(f"/proc/{pid}/net/{name}").read_text() for name in ("tcp", "tcp6")]
    except OSError:
        return set()
    found = set()
    for table in tables:
        for line in table.splitlines()[1:]:
            fields = line.split()
            remote_port = int(fields[2].rsplit(":", 1)[1], 16)
            if remote_port == port and fields[3] == ESTABLISHED and fields[9] in inodes:
                found.add(fields[9])
    return found


class RunScript:
    def __init__(self, process: subprocess.Popen[bytes], server: Server, log: Path) -> None:
        self.process, self.server, self.log = process, server, log

    def gunicorn_workers(self) -> list[int]:
        """The pids of gunicorn's worker processes (children of its master)."""
        processes = session_processes(self.process.pid)
        gunicorn = {pid for pid, cmd in processes.items() if "gunicorn project.wsgi" in cmd}
        return [pid for pid in gunicorn if _parent(pid) in gunicorn]

    def web_sockets(self) -> dict[int, set[str]]:
        """Each web worker's sockets connected to the database, by inode."""
        port = int(connection.settings_dict.get("PORT") or 5432)
        return {pid: connections_to(pid, port) for pid in self.gunicorn_workers()}

    def web_connections(self) -> int:
        """The web processes' connections to the database: distinct sockets."""
        return len(set().union(*self.web_sockets().values()))


def _parent(pid: int) -> int:
    try:
        return int((Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split())[1])
    except OSError:
        return 0


@pytest.fixture
def run_script(tmp_path: Path) -> Iterator[RunScript]:
    require_postgres()
    port = free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"DJANGO_DEBUG", "DJANGO_WEB_PROCESS", "DJANGO_SETTINGS_MODULE"}
        and not k.startswith("CELERY_")
    }
    env.update(
        DATABASE_URL=database_url(),
        VAR_DIR=str(tmp_path),  # the embedded broker, the static files, the secret key
        HOST="127.0.0.1",
        PORT=str(port),
        WEB_WORKERS=str(WEB_WORKERS),
        WEB_THREADS=str(WEB_THREADS),
        WORKER_CONCURRENCY="1",
        # The interpreter running the suite, as tests/integration/test_docs_commands.py runs it.
        BIN=str(BIN),
        PATH=f"{BIN}:{env.get('PATH', '')}",
    )
    log = tmp_path / "run.log"
    with run_sh(env, log) as process:
        server = Server(port)

        def serving() -> bool:
            assert process.poll() is None, log.read_text()[-3000:]
            try:
                return server.request("GET", "/api/", timeout=2)[0] == 401  # up, asking for a token
            except OSError:
                return False

        wait_for(serving, 120, f"scripts/run.sh to serve (log: {log})", interval=0.25)
        yield RunScript(process, server, log)


def test_make_run_on_postgresql_serves_through_gunicorn_with_bounded_pooled_connections(
    run_script: RunScript,
) -> None:
    server = run_script.server
    _, headers, _ = server.request("GET", "/api/")
    assert headers.get("Server", "").startswith("gunicorn"), headers  # not runserver's WSGIServer
    assert "runserver" not in " ".join(session_processes(run_script.process.pid).values())
    assert len(run_script.gunicorn_workers()) == WEB_WORKERS

    producer = UserFactory(username="producer-run")
    producer.user_permissions.add(Permission.objects.get(codename="submit_event"))
    auth = {"Authorization": f"Token {Token.objects.create(user=producer).key}"}
    statuses: Counter[int] = Counter()
    errors: list[BaseException] = []
    peak, done = [0], threading.Event()
    at_peak: list[dict[int, set[str]]] = [{}]  # which worker held which socket, for a failure

    def sample() -> None:
        while not done.is_set():
            held = run_script.web_sockets()
            count = len(set().union(*held.values()))
            if count > peak[0]:
                peak[0], at_peak[0] = count, held
            time.sleep(0.02)

    def client() -> None:
        try:
            for _ in range(EVENTS_EACH):
                answer: Any = server.request("POST", "/api/events/", place_order_event(), auth)
                statuses[answer[0]] += 1
        except BaseException as exc:
            errors.append(exc)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    clients = [threading.Thread(target=client, daemon=True) for _ in range(CLIENTS)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join(60)
    done.set()
    sampler.join(10)
    assert not errors, errors[:3]
    assert statuses == {202: CLIENTS * EVENTS_EACH}, statuses
    # Bounded: each of the WEB_WORKERS processes holds at most WEB_THREADS pooled connections,
    # whatever the number of clients. Pooled: they stay open between requests (min_size 1),
    # where connections opened per request (CONN_MAX_AGE 0, no pool) would all be closed.
    assert 1 <= peak[0] <= WEB_WORKERS * WEB_THREADS, (peak[0], at_peak[0], run_script.log)
    assert 1 <= run_script.web_connections() <= WEB_WORKERS * WEB_THREADS
    print(f"peak connections of the web processes: {peak[0]} ({CLIENTS} clients)")
    text = run_script.log.read_text()
    assert "Starting gunicorn" in text
    assert "Listening at: http://127.0.0.1:" in text
