"""Fixtures of the fault-injection suite: the brokers, a scenario per test, the report."""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.faults.brokers import Broker, LocalSQS, PrivateRedis, RabbitMQ
from tests.faults.harness import Scenario, postgres_version
from tests.faults.ledger import seed_catalogue
from tests.faults.report import Report
from tests.services import AMQP_URL, ROOT, require_broker, require_postgres
from tests.sqs import SQSEmulator

REPORT = pytest.StashKey[Report]()
BROKER_NAMES = ("rabbitmq", "redis", "sqs")
LABELS = {"rabbitmq": "RabbitMQ", "redis": "Redis", "sqs": "SQS"}

#: The scenarios of the other modules that apply to SQS; the emulator keeps its queues in memory,
#: so those that stop or restart the broker do not (tests/faults/test_sqs.py has SQS's own).
SQS_SCENARIOS = frozenset(
    {
        "test_same_event_published_three_times",
        "test_child_killed_after_commit_before_ack",
        "test_child_killed_inside_the_transaction",
        "test_whole_worker_killed_in_a_burst",
        "test_two_workers_receive_the_same_event",
        "test_published_twice_under_two_task_ids",
        "test_poison_messages_dead_lettered_then_redriven",
        "test_two_consumers_of_the_same_event",
    }
)
#: The work queue's visibility timeout on SQS: long enough that a paused task is not handed out
#: again, except where a scenario waits for a dead worker's messages to come back.
SQS_VISIBILITY = {"test_whole_worker_killed_in_a_burst": 10}
SQS_DEFAULT_VISIBILITY = 60


def pytest_configure(config: pytest.Config) -> None:
    config.stash[REPORT] = Report()


def _on_sqs(item: pytest.Item) -> bool:
    callspec = getattr(item, "callspec", None)
    return callspec is not None and callspec.params.get("broker") == "sqs"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run on SQS only the scenarios that apply to it."""
    keep, dropped = [], []
    for item in items:
        module = getattr(getattr(item, "module", None), "__name__", "")
        if (
            _on_sqs(item)
            and getattr(item, "originalname", item.name) not in SQS_SCENARIOS
            and not module.endswith("test_sqs")
        ):
            dropped.append(item)
        else:
            keep.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


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
    """``make faults`` sets FAULTS_REPORT: the table goes there (docs/reliability.md).

    A run merges its rows into the page (replacing those of the scenarios it ran) unless
    FAULTS_REPORT_MERGE=0, which ``make faults`` sets: a run of the whole suite rewrites it.
    FAULTS_COMMAND names the run on the page; by default, the pytest command line.
    """
    target = os.environ.get("FAULTS_REPORT")
    report = session.config.stash.get(REPORT, None)
    if not target or report is None or not report.rows:
        return
    path = Path(target)
    if not path.is_absolute():
        path = ROOT / path
    invoked = "pytest " + shlex.join(session.config.invocation_params.args)
    report.write(
        path,
        os.environ.get("FAULTS_COMMAND", invoked),
        os.environ.get("FAULTS_REPORT_SECTION", "faults"),
        merge=os.environ.get("FAULTS_REPORT_MERGE", "1") != "0",
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


@pytest.fixture(scope="session")
def local_sqs(sqs_emulator: SQSEmulator) -> LocalSQS:
    """The SQS emulator of tests/sqs.py (moto_server on a free loopback port) as a broker."""
    return LocalSQS(sqs_emulator)


@pytest.fixture(params=BROKER_NAMES)
def broker(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Broker:
    require_postgres()
    name = {"redis": "private_redis", "sqs": "local_sqs"}.get(request.param, request.param)
    server: Broker = request.getfixturevalue(name)
    if isinstance(server, LocalSQS):
        server.visibility_timeout = SQS_VISIBILITY.get(
            getattr(request.node, "originalname", ""), SQS_DEFAULT_VISIBILITY
        )
        server.max_receive_count = 20
        # The workers, the relay and manage.py inherit them (tests/services.py: os.environ).
        for key, value in {
            **LocalSQS.ENV,
            "CELERY_VISIBILITY_TIMEOUT": str(server.visibility_timeout),
            "CELERY_SQS_MAX_RECEIVE_COUNT": str(server.max_receive_count),
        }.items():
            monkeypatch.setenv(key, value)
    report = request.config.stash[REPORT]
    report.versions.setdefault(LABELS[server.kind], server.version())
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
        if isinstance(broker, LocalSQS):
            # As the example's worker declares them (project/celery.py), before the first send.
            broker.declare(made.queue)
        return made

    yield start
    for made in created:
        made.close()
