"""Fixtures of the fault-injection suite: the brokers, a scenario per test, the report."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.faults.brokers import Broker, PrivateRedis, RabbitMQ
from tests.faults.harness import Scenario, postgres_version
from tests.faults.ledger import seed_catalogue
from tests.faults.report import Report
from tests.services import AMQP_URL, ROOT, require_broker, require_postgres

REPORT = pytest.StashKey[Report]()
BROKER_NAMES = ("rabbitmq", "redis")


def pytest_configure(config: pytest.Config) -> None:
    config.stash[REPORT] = Report()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    if (
        getattr(report, "wasxfail", None)
        and report.failed
        and str(report.longrepr).startswith("REQUIRE_SERVICES=1 but the service test was skipped")
    ):
        # tests/conftest.py fails every skipped service test under REQUIRE_SERVICES=1, and an
        # expected failure is reported as a skip: it stays an expected failure here.
        report.outcome = "skipped"
    if REPORT not in item.config.stash:
        return
    results = item.config.stash[REPORT].outcomes
    if report.when == "call" or (report.when == "setup" and not report.passed):
        if hasattr(report, "wasxfail"):
            results[item.nodeid] = "xfailed" if report.skipped else "xpassed"
        else:
            results[item.nodeid] = report.outcome
    elif report.when == "teardown" and report.failed:
        results[item.nodeid] = "failed"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    report = terminalreporter.config.stash.get(REPORT, None)
    if report is None or not report.rows:
        return
    terminalreporter.section("fault-injection scenarios")
    for line in [*report.table(), "", *report.figures()]:
        terminalreporter.write_line(line)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """``make faults`` sets FAULTS_REPORT: the table goes there (docs/reliability.md)."""
    target = os.environ.get("FAULTS_REPORT")
    report = session.config.stash.get(REPORT, None)
    if not target or report is None or not report.rows:
        return
    path = Path(target)
    if not path.is_absolute():
        path = ROOT / path
    report.write(
        path,
        os.environ.get("FAULTS_COMMAND", "pytest -m faults"),
        os.environ.get("FAULTS_REPORT_SECTION", "faults"),
    )


@pytest.fixture(scope="session")
def rabbitmq() -> RabbitMQ:
    require_broker(AMQP_URL)
    return RabbitMQ()


@pytest.fixture(scope="session")
def private_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRedis]:
    """A redis-server of the suite's own: restarting it disturbs no one else."""
    server = PrivateRedis(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=BROKER_NAMES)
def broker(request: pytest.FixtureRequest) -> Broker:
    require_postgres()
    name = "private_redis" if request.param == "redis" else request.param
    server: Broker = request.getfixturevalue(name)
    report = request.config.stash[REPORT]
    label = "Redis" if server.kind == "redis" else "RabbitMQ"
    report.versions.setdefault(label, server.version())
    return server


@pytest.fixture
def scenario(
    request: pytest.FixtureRequest, broker: Broker, tmp_path: Path, transactional_db: None
) -> Iterator[Callable[[str, str], Scenario]]:
    """``scenario(number, title)``: a seeded catalogue, a queue of its own, workers on demand."""
    report = request.config.stash[REPORT]
    report.versions.setdefault("PostgreSQL", postgres_version())
    created: list[Scenario] = []

    def start(number: str, title: str) -> Scenario:
        seed_catalogue()
        directory = tmp_path / f"scenario-{len(created)}"
        made = Scenario(number, title, broker, directory, report, request.node.nodeid)
        created.append(made)
        return made

    yield start
    for made in created:
        made.close()
