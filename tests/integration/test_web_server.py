"""The web process as deployed: gunicorn on PostgreSQL, under load and through an outage."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
from django.contrib.auth.models import Permission
from django.db import connection
from psycopg import sql
from rest_framework.authtoken.models import Token

from idempotency.models import IdempotencyKey, OutboxMessage
from tests.factories import CustomerFactory, ProductFactory, UserFactory, place_order_event
from tests.outage import backends, outage_control
from tests.services import ROOT, database_url, require_postgres, stop_process, wait_for

pytestmark = [pytest.mark.services, pytest.mark.django_db(transaction=True)]

WORKERS, THREADS = 2, 4
CLIENTS, EVENTS_EACH = 64, 10


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Server:
    def __init__(self, port: int) -> None:
        self.port = port

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        timeout: float = 30,
    ) -> tuple[int, dict[str, str], bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            data = json.dumps(body).encode() if body is not None else None
            sent = {"Content-Type": "application/json", **(headers or {})}
            connection.request(method, path, body=data, headers=sent)
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            connection.close()


@contextmanager
def gunicorn(tmp_path: Path, **extra_env: str) -> Iterator[Server]:
    """gunicorn serving project.wsgi on the test database, DEBUG off, static files collected."""
    require_postgres()
    env = {
        **{k: v for k, v in os.environ.items() if k not in {"DJANGO_DEBUG", "DJANGO_WEB_PROCESS"}},
        "DATABASE_URL": database_url(),
        "VAR_DIR": str(tmp_path),
        "CELERY_BROKER_URL": "embedded://",
        "DJANGO_SECRET_KEY": "test-web-server",
        "WEB_THREADS": str(THREADS),
        "DJANGO_DB_POOL_TIMEOUT": "2",
        **extra_env,
    }
    manage = [sys.executable, "manage.py", "collectstatic", "--noinput", "--verbosity", "0"]
    subprocess.run(manage, cwd=ROOT, env=env, check=True)
    port = free_port()
    log = tmp_path / "gunicorn.log"
    command = [
        *(sys.executable, "-m", "gunicorn", "project.wsgi:application"),
        *("--bind", f"127.0.0.1:{port}", "--workers", str(WORKERS), "--threads", str(THREADS)),
        *("--worker-class", "gthread", "--timeout", "60", "--access-logfile", "-"),
    ]
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    running = Server(port)

    def up() -> bool:
        assert process.poll() is None, log.read_text()[-3000:]
        try:
            return running.request("GET", "/static/admin/css/base.css", timeout=2)[0] == 200
        except OSError:
            return False

    try:
        wait_for(up, 60, f"gunicorn to serve (log: {log})")
        yield running
    finally:
        stop_process(process)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    with gunicorn(tmp_path) as running:
        yield running


@pytest.fixture
def token(db: Any) -> str:
    producer = UserFactory(username="producer-web")
    producer.user_permissions.add(Permission.objects.get(codename="submit_event"))
    ProductFactory(product_id="PROD-A", stock=10_000)
    CustomerFactory(customer_id="CUST-1")
    return Token.objects.create(user=producer).key


def test_64_clients_get_no_5xx_and_the_connections_stay_bounded(server: Server, token: str) -> None:
    auth = {"Authorization": f"Token {token}"}
    statuses: Counter[int] = Counter()
    errors: list[BaseException] = []
    peak, done = [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], backends())
            time.sleep(0.05)

    def client() -> None:
        try:
            for _ in range(EVENTS_EACH):
                status, _, _ = server.request("POST", "/api/events/", place_order_event(), auth)
                statuses[status] += 1
        except BaseException as exc:
            errors.append(exc)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    clients = [threading.Thread(target=client, daemon=True) for _ in range(CLIENTS)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join(300)
    done.set()
    sampler.join(10)
    assert not errors, errors[:3]
    assert statuses == {202: CLIENTS * EVENTS_EACH}, statuses
    assert OutboxMessage.objects.count() == CLIENTS * EVENTS_EACH
    print(f"peak connections to the database: {peak[0]} ({CLIENTS} clients)")
    # Every gunicorn thread holds at most one pooled connection; plus this test's own.
    assert 1 < peak[0] <= WORKERS * THREADS + 1, peak[0]


def test_static_files_and_the_admin_work_with_debug_off(server: Server) -> None:
    status, headers, _ = server.request("GET", "/static/admin/css/base.css")
    assert (status, headers["Content-Type"].split(";")[0]) == (200, "text/css")
    status, _, body = server.request("GET", "/admin/login/")
    assert status == 200
    assert b"csrfmiddlewaretoken" in body
    # DEBUG is off: an unknown URL is a plain 404, not the debug page listing every route.
    status, _, body = server.request("GET", "/no-such-page/")
    assert status == 404
    assert b"URLconf" not in body


def test_a_chunked_body_of_30_mb_is_never_accepted(server: Server, token: str) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    chunk = b"x" * (1024 * 1024)
    try:
        connection.putrequest("POST", "/api/orders/")
        for name, value in {
            "Authorization": f"Token {token}",
            "Idempotency-Key": "chunked-1",
            "Content-Type": "application/json",
            "Transfer-Encoding": "chunked",
        }.items():
            connection.putheader(name, value)
        connection.endheaders()
        try:
            for _ in range(30):
                connection.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            connection.send(b"0\r\n\r\n")
        except OSError:
            pass  # the server answered and closed before reading it all
        status = connection.getresponse().status
    finally:
        connection.close()
    assert 400 <= status < 500, status
    assert not OutboxMessage.objects.exists()


def test_when_the_database_refuses_connections_the_api_answers_503_then_recovers(
    server: Server, token: str
) -> None:
    auth = {"Authorization": f"Token {token}"}
    assert server.request("POST", "/api/events/", place_order_event(), auth)[0] == 202
    with outage_control() as outage:
        outage.begin()
        for method, path, body, extra in [
            ("POST", "/api/events/", place_order_event(), {}),
            ("GET", "/api/orders/", None, {}),
            (
                "POST",
                "/api/orders/",
                {"customerId": "CUST-1", "items": []},
                {"Idempotency-Key": "o"},
            ),
        ]:
            status, headers, content = server.request(method, path, body, {**auth, **extra})
            assert status == 503, (path, status, content[:300])
            assert int(headers["Retry-After"]) >= 1
            assert headers["Content-Type"] == "application/problem+json"
            assert json.loads(content)["status"] == 503
    # Once the database is back, the pool reconnects by itself.
    wait_for(
        lambda: server.request("POST", "/api/events/", place_order_event(), auth)[0] == 202,
        30,
        "the API to accept events again",
        interval=0.5,
    )
    assert not IdempotencyKey.objects.filter(state="completed").exists()


# --- Attacks on the front door as deployed ----------------------------------------------------

ORDER = {"customerId": "CUST-1", "items": [{"productId": "PROD-A", "quantity": 1}]}


@contextmanager
def table_locked(table: str) -> Iterator[None]:
    """Every write to *table* waits (holding its request's connection) until the block ends."""
    s = connection.settings_dict
    locker = psycopg.connect(
        host=s.get("HOST") or "127.0.0.1",
        port=s.get("PORT") or 5432,
        user=s.get("USER") or "postgres",
        dbname=s["NAME"],
    )
    try:
        locker.execute(sql.SQL("LOCK TABLE {} IN EXCLUSIVE MODE").format(sql.Identifier(table)))
        yield
    finally:
        try:
            locker.rollback()
            locker.close()
        except psycopg.Error:
            pass  # an outage ended the session, and its lock with it


def waiting_on_locks() -> int:
    """Requests of the server blocked on a lock (the table lock above)."""
    with psycopg.connect(database_url(), autocommit=True) as probe:
        row = probe.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock'"
        ).fetchone()
        return int(row[0]) if row else 0


def keyed(server: Server, token: str, key: str, body: Any = ORDER) -> tuple[int, Any]:
    headers = {"Authorization": f"Token {token}", "Idempotency-Key": key}
    status, _, content = server.request("POST", "/api/orders/", body, headers)
    return status, (json.loads(content) if content else None)


def in_threads(count: int, target: Any) -> list[Any]:
    results: list[Any] = [None] * count

    def run(index: int) -> None:
        try:
            results[index] = target(index)
        except BaseException as exc:
            results[index] = exc

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return results


def test_64_clients_with_the_same_key_place_one_order(server: Server, token: str) -> None:
    """Same body: one effect, the others 409 then, retried, the same 202 replayed. A different
    body with the key: 409 while it runs, then 422, never a second effect."""
    other = {**ORDER, "items": [{"productId": "PROD-A", "quantity": 2}]}

    def client(index: int) -> list[int]:
        body = ORDER if index % 2 else other
        seen = []
        for _ in range(200):
            status, content = keyed(server, token, "one-key", body)
            seen.append(status)
            if status != 409:
                break
            time.sleep(0.05)
        return [*seen, content]

    results = in_threads(CLIENTS, client)
    assert not [r for r in results if isinstance(r, BaseException)], results[:3]
    finals = Counter(r[-2] for r in results)
    assert all(status in (202, 409, 422) for r in results for status in r[:-1]), results
    # Whichever body came first won; every client of the other body got 422.
    assert sorted(finals) == [202, 422], finals
    assert finals[202] == finals[422] == CLIENTS // 2
    assert len({json.dumps(r[-1]) for r in results if r[-2] == 202}) == 1
    assert OutboxMessage.objects.count() == 1
    assert IdempotencyKey.objects.get().state == "completed"


def test_an_exhausted_pool_answers_503_in_a_bounded_time(tmp_path: Path, token: str) -> None:
    """One pooled connection per worker for four threads: the requests that cannot get one
    wait DJANGO_DB_POOL_TIMEOUT, then get 503 with Retry-After; none waits for the others."""
    auth = {"Authorization": f"Token {token}"}
    with gunicorn(tmp_path, DJANGO_DB_POOL_MAX_SIZE="1", DJANGO_DB_POOL_TIMEOUT="1") as server:
        assert server.request("POST", "/api/events/", place_order_event(), auth)[0] == 202

        def client(index: int) -> tuple[int, float, str | None]:
            started = time.monotonic()
            status, headers, _ = server.request("POST", "/api/events/", place_order_event(), auth)
            return status, time.monotonic() - started, headers.get("Retry-After")

        with table_locked("idempotency_outboxmessage"):
            results: list[Any] = []
            runner = threading.Thread(target=lambda: results.extend(in_threads(8, client)))
            runner.start()
            # Both workers' connections are stuck behind the lock; the rest are refused.
            wait_for(lambda: waiting_on_locks() >= 1, 20, "a request to hold its connection")
            time.sleep(4)
            peak = backends()
        runner.join(60)
    assert not [r for r in results if isinstance(r, BaseException)], results
    refused = [r for r in results if r[0] == 503]
    assert {r[0] for r in results} <= {202, 503}, results
    assert len(refused) >= 8 - WORKERS, results
    assert all(r[2] is not None and r[1] < 4 for r in refused), refused
    assert OutboxMessage.objects.count() == 1 + sum(r[0] == 202 for r in results)
    # The two pooled connections, the locker and this test's own.
    assert peak <= WORKERS + 2, peak


def test_a_retry_while_the_first_request_runs_is_a_409_and_never_a_second_order(
    server: Server, token: str
) -> None:
    with table_locked("idempotency_outboxmessage"):
        first: list[Any] = []
        runner = threading.Thread(target=lambda: first.append(keyed(server, token, "race")))
        runner.start()
        wait_for(lambda: waiting_on_locks() >= 1, 20, "the first request to be in its view")
        time.sleep(2.5)  # past CLAIM_WINDOW: the marker is old, but its owner holds its lock
        started = time.monotonic()
        assert keyed(server, token, "race")[0] == 409
        assert time.monotonic() - started < 2  # NOWAIT: answered without waiting
    runner.join(30)
    assert first[0][0] == 202
    assert keyed(server, token, "race") == first[0]
    assert OutboxMessage.objects.count() == 1


def test_the_database_lost_inside_the_view_is_a_503_and_the_retry_places_one_order(
    server: Server, token: str
) -> None:
    first: list[Any] = []
    with outage_control() as outage, table_locked("idempotency_outboxmessage"):
        runner = threading.Thread(target=lambda: first.append(keyed(server, token, "lost")))
        runner.start()
        wait_for(lambda: waiting_on_locks() >= 1, 20, "the request to be in its view")
        outage.begin(seconds=3)  # ends the request's session (and the locker's)
        runner.join(60)
        assert first, "the request did not answer"
        assert first[0][0] == 503, first
        wait_for(lambda: not outage.active, 10, "the outage to end")
    wait_for(
        lambda: keyed(server, token, "lost")[0] != 503, 30, "the API to answer again", interval=0.5
    )
    status, body = keyed(server, token, "lost")
    assert status == 202, body
    assert OutboxMessage.objects.count() == 1
    assert IdempotencyKey.objects.get().state == "completed"
