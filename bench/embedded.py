"""Events applied per second on the embedded defaults, as a user trying the service sees it.

    python -m bench.embedded                       # 300 PlaceOrder + 150 duplicates, 8 clients
    CELERY_EMBEDDED_TRANSPORT=filesystem CELERY_POLLING_INTERVAL=1 \
        python -m bench.embedded --broker-url filesystem://   # kombu's transport as it comes

It starts scripts/run.sh (what `make run` runs: SQLite, the embedded broker, a worker, the
relay, the web server) in a fresh directory, posts the events through the API from several
clients at once, and measures how soon the worker has applied every delivery: each event once,
each duplicate discarded. The rate is deliveries over the span from the first POST to the last
delivery handled.

It measures the example service as `make run` starts it, so with the example's settings (not
bench/settings.py): ``RECORD_DUPLICATES`` on, which it needs to count the duplicates discarded,
and DEBUG off (a ``DJANGO_DEBUG`` in the environment is not passed on).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def manage(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [str(ROOT / ".venv/bin/python"), "manage.py", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout


def post(port: int, token: str, event: dict) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request(
            "POST",
            "/api/events/",
            body=json.dumps(event),
            headers={"Authorization": f"Token {token}", "Content-Type": "application/json"},
        )
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def handled(database: Path) -> tuple[int, int]:
    """Events applied, and duplicates discarded, as the worker recorded them."""
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=20) as db:
        row = db.execute(
            "SELECT count(*), coalesce(sum(duplicate_count), 0) FROM idempotency_processedevent "
            "WHERE consumer = 'orders.tasks.place_order'"
        ).fetchone()
    return int(row[0]), int(row[1])


def measure(
    events: int, duplicates: int, clients: int, timeout: float, broker_url: str
) -> dict[str, float]:
    var = Path(tempfile.mkdtemp(prefix="bench-embedded-"))
    port = free_port()
    # The example's own settings module, not a benchmark's (python -m bench sets bench.settings).
    dropped = {"DATABASE_URL", "CELERY_BROKER_URL", "DJANGO_SETTINGS_MODULE", "DJANGO_DEBUG"}
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    env.update(
        VAR_DIR=str(var), PORT=str(port), IDEMPOTENCY_LOG_LEVEL="WARNING",
        CELERY_BROKER_URL=broker_url,
    )  # fmt: skip
    log = (var / "run.log").open("wb")
    server = subprocess.Popen(
        ["bash", "scripts/run.sh"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"scripts/run.sh did not come up: see {var / 'run.log'}")
            try:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                connection.request("GET", "/api/")
                if connection.getresponse().status == 401:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        token = manage(env, "drf_create_token", "admin").split()[2]
        # Stock for every order, so each is applied as placed rather than rejected.
        manage(env, "shell", "-c", "from orders.models import Product; "
               "Product.objects.update(stock=10**9)")  # fmt: skip
        placed = [
            {
                "eventType": "PlaceOrder",
                "eventId": str(uuid.uuid4()),
                "timestamp": "2023-10-27T10:00:00Z",
                "orderId": f"ORD-BENCH-{n}",
                "customerId": "CUST-1",
                "items": [{"productId": "PROD-A", "quantity": 1}],
            }
            for n in range(events)
        ]
        batch = placed + random.Random(0).sample(placed, duplicates)
        random.Random(1).shuffle(batch)
        statuses: list[int] = []
        lock = threading.Lock()

        def client(share: list[dict]) -> None:
            for event in share:
                status = post(port, token, event)
                with lock:
                    statuses.append(status)

        started = time.monotonic()
        threads = [
            threading.Thread(target=client, args=(batch[i::clients],)) for i in range(clients)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        posted = time.monotonic()
        if statuses.count(202) != len(batch):
            sys.exit(f"not every POST was accepted: {sorted(set(statuses))}")
        database = var / "db.sqlite3"
        while True:
            applied, discarded = handled(database)
            if applied >= events and discarded >= duplicates:
                break
            if time.monotonic() - started > timeout:
                sys.exit(f"only {applied} applied, {discarded} discarded after {timeout:.0f} s")
            time.sleep(0.1)
        done = time.monotonic()
        if applied != events or discarded != duplicates:
            sys.exit(f"{applied} applied and {discarded} discarded: not {events} and {duplicates}")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()
    deliveries = events + duplicates
    return {
        "post_seconds": posted - started,
        "posted_per_second": deliveries / (posted - started),
        "apply_seconds": done - started,
        "applied_per_second": deliveries / (done - started),
        "lag_seconds": done - posted,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--events", type=int, help="distinct events (300; quick 40)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 40 events")
    parser.add_argument("--json", help="also write the measurements to this file")
    parser.add_argument("--duplicates", type=int, help="events posted twice (half of --events)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (8)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds before giving up")
    parser.add_argument(
        "--broker-url",
        default="embedded://",
        help="embedded:// (project/embedded_broker.py, the default), or filesystem:// with the "
        "transport CELERY_EMBEDDED_TRANSPORT names",
    )
    args = parser.parse_args()
    args.events = args.events or (40 if args.quick else 300)
    duplicates = args.events // 2 if args.duplicates is None else args.duplicates
    result = measure(args.events, duplicates, args.clients, args.timeout, args.broker_url)
    # What the URL selects (project/settings.py): embedded:// its own transport, filesystem://
    # the one CELERY_EMBEDDED_TRANSPORT names.
    transport = (
        "project.embedded_broker:Transport"
        if args.broker_url.startswith("embedded://")
        else os.environ.get("CELERY_EMBEDDED_TRANSPORT", "project.embedded_broker:Transport")
    )
    polling = os.environ.get("CELERY_POLLING_INTERVAL", "0.05")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "events": args.events,
                    "duplicates": duplicates,
                    "clients": args.clients,
                    "broker_url": args.broker_url,
                    "transport": transport,
                    "polling_interval": polling,
                    **result,
                },
                indent=1,
            )
        )
    print(
        f"{args.events} events + {duplicates} duplicates, {args.clients} clients, broker "
        f"{args.broker_url}, polling interval {polling} s: "
        f"posted in {result['post_seconds']:.1f} s "
        f"({result['posted_per_second']:.1f}/s); all applied {result['apply_seconds']:.1f} s "
        f"after the first POST ({result['applied_per_second']:.1f} deliveries/s), "
        f"{result['lag_seconds']:.1f} s after the last"
    )


if __name__ == "__main__":
    main()
