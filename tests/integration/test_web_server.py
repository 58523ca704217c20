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
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import Permission
from rest_framework.authtoken.models import Token

from idempotency.models import IdempotencyKey, OutboxMessage
from tests.factories import CustomerFactory, ProductFactory, UserFactory, place_order_event
from tests.outage import backends, outage_control
from tests.services import ROOT, database_url, require_postgres, wait_for

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


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    """gunicorn serving project.wsgi on the test database, DEBUG off, static files collected."""
    require_postgres()
    env = {
        **{k: v for k, v in os.environ.items() if k not in {"DJANGO_DEBUG", "DJANGO_WEB_PROCESS"}},
        "DATABASE_URL": database_url(),
        "VAR_DIR": str(tmp_path),
        "CELERY_BROKER_URL": "filesystem://",
        "DJANGO_SECRET_KEY": "test-web-server",
        "WEB_THREADS": str(THREADS),
        "DJANGO_DB_POOL_TIMEOUT": "2",
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
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


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
