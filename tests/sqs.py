"""A local SQS endpoint for the tests: ``moto_server``, an emulator of the Amazon SQS API.

:func:`sqs_emulator` (a session fixture, ``pytest_plugins`` in tests/conftest.py) starts one on a
free loopback port and stops it after the run. It is an emulator, not SQS: docs/celery.md lists
the behaviours the suite checked against it.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.services import unavailable, wait_for

#: Credentials and region the emulator accepts (any will do); processes started by a test that
#: talk to it need them in their environment, with the endpoint's plain HTTP allowed.
SQS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "CELERY_SQS_SECURE": "0",
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class SQSEmulator:
    """A ``moto_server`` process; :attr:`url` is a kombu broker URL, :attr:`endpoint` boto3's."""

    def __init__(self, directory: Path) -> None:
        binary = shutil.which("moto_server", path=str(Path(sys.executable).parent))
        if binary is None:
            unavailable("moto_server is not installed (moto[server], requirements/dev.txt)")
        self.binary = str(binary)
        self.directory = directory
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.url = f"sqs://testing:testing@127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.client = self.new_client()

    def new_client(self) -> Any:
        import boto3

        return boto3.client(
            "sqs",
            endpoint_url=self.endpoint,
            region_name=SQS_ENV["AWS_DEFAULT_REGION"],
            aws_access_key_id=SQS_ENV["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=SQS_ENV["AWS_SECRET_ACCESS_KEY"],
        )

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        with (self.directory / "moto.log").open("wb") as log:
            self.process = subprocess.Popen(
                [self.binary, "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_for(self.answers, 60, f"moto_server to answer on {self.endpoint}", interval=0.2)
        except BaseException:
            self.stop()
            raise

    def answers(self) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        if self.process is None or self.process.poll() is not None:
            return False
        try:
            self.client.list_queues()
        except (BotoCoreError, ClientError):
            return False
        return True

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@pytest.fixture(scope="session")
def sqs_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SQSEmulator]:
    """A local SQS endpoint for the whole run, stopped at its end."""
    emulator = SQSEmulator(tmp_path_factory.mktemp("sqs"))
    emulator.start()
    try:
        yield emulator
    finally:
        emulator.stop()
