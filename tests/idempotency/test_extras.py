"""Each optional dependency has an extra, and its absence names that extra.

Every case runs in a fresh interpreter with the dependency hidden (``sys.modules[name] = None``
makes its import fail as if it were not installed) and a minimal project: the app and Django's
contrib apps, no Celery app, no REST framework.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from idempotency.extras import EXTRAS

ROOT = Path(__file__).resolve().parents[2]

PRELUDE = """\
import json, sys
for name in {hidden!r}:
    sys.modules[name] = None
import django
from django.conf import settings
settings.configure(
    INSTALLED_APPS=[
        "django.contrib.admin", "django.contrib.auth", "django.contrib.contenttypes",
        "django.contrib.sessions", "django.contrib.messages", "idempotency",
    ],
    DATABASES={{"default": {{"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}}}},
    USE_TZ=True,
)
django.setup()
"""


def run(hidden: list[str], body: str) -> dict:
    code = PRELUDE.format(hidden=hidden) + textwrap.dedent(body)
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    env["PYTHONPATH"] = str(ROOT)
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


IMPORT = """\
import importlib
from django.core.exceptions import ImproperlyConfigured
module, _, name = {module!r}.partition(":")
try:
    imported = importlib.import_module(module)
    if name:
        getattr(imported, name)
except ImproperlyConfigured as exc:
    print(json.dumps({{"error": type(exc).__name__, "message": str(exc),
                       "import_error": isinstance(exc, ImportError)}}))
else:
    print(json.dumps({{"error": None}}))
"""


@pytest.mark.parametrize(
    ("module", "hidden", "extra"),
    [
        ("idempotency.celery", ["celery"], "celery"),
        ("idempotency.tasks", ["celery"], "celery"),
        # idempotency.http loads its parts on first use (its models need no DRF).
        ("idempotency.http:idempotent_request", ["rest_framework"], "drf"),
        ("idempotency.openapi", ["drf_spectacular"], "openapi"),
        ("idempotency.openapi", ["rest_framework"], "openapi"),
        ("idempotency.consumers.nats", ["nats"], "nats"),
        ("idempotency.consumers:JetStreamConsumer", ["nats"], "nats"),
        ("idempotency.consumers:KombuConsumer", ["kombu"], "kombu"),
        ("idempotency.consumers.kombu", ["kombu", "celery"], "kombu"),
        ("idempotency.celery.sqs", ["boto3"], "sqs"),
        ("idempotency.celery.sqs:Transport", ["boto3"], "sqs"),
        # It sits under idempotency.celery: without Celery, that extra is named first.
        ("idempotency.celery.sqs", ["celery"], "celery"),
    ],
)
def test_a_module_without_its_extra_names_the_extra(
    module: str, hidden: list[str], extra: str
) -> None:
    outcome = run(hidden, IMPORT.format(module=module))
    assert outcome["error"] == "MissingExtra", outcome
    assert f'pip install "django-idempotency[{extra}]"' in outcome["message"]
    # Code that probes with `except ImportError` keeps working.
    assert outcome["import_error"] is True


COMMAND = """\
from io import StringIO
from django.core.management import call_command, CommandError
try:
    call_command(*{argv!r}, stdout=StringIO(), stderr=StringIO())
except CommandError as exc:
    print(json.dumps({{"error": "CommandError", "message": str(exc)}}))
except BaseException as exc:
    print(json.dumps({{"error": type(exc).__name__, "message": str(exc)}}))
else:
    print(json.dumps({{"error": None}}))
"""

#: consume_events with a handler any interpreter has.
CONSUME = ["consume_events", "--handler", "json.loads"]


@pytest.mark.parametrize(
    ("argv", "hidden", "extra"),
    [
        (["relay_outbox"], ["celery", "kombu"], "celery"),
        (["dead_letters", "import", "--queue", "q"], ["celery", "kombu"], "celery"),
        (
            [*CONSUME, "kombu", "--url", "memory://", "--queue", "q"],
            ["celery", "kombu"],
            "kombu",
        ),
        (
            [*CONSUME, "nats", "--stream", "s", "--subject", "x", "--durable", "d"],
            ["nats"],
            "nats",
        ),
    ],
)
def test_a_command_without_its_extra_is_a_command_error(
    argv: list[str], hidden: list[str], extra: str
) -> None:
    outcome = run(hidden, COMMAND.format(argv=argv))
    assert outcome["error"] == "CommandError", outcome
    assert f'pip install "django-idempotency[{extra}]"' in outcome["message"]


def test_the_app_itself_needs_no_extra() -> None:
    # The inbox, its admin and the purge command run on Django alone.
    outcome = run(
        ["celery", "kombu", "rest_framework", "drf_spectacular", "prometheus_client", "tqdm"],
        """\
        import idempotency.admin, idempotency.models
        from idempotency.inbox import idempotent
        from django.core.management import call_command
        from io import StringIO
        call_command("migrate", verbosity=0)
        with idempotent("billing", "e-1") as claim:
            duplicate = claim.duplicate
        class Terminal(StringIO):
            def isatty(self):
                return True

        out = Terminal()
        call_command("purge_processed_events", stdout=out)
        print(json.dumps({"error": None, "duplicate": duplicate, "purge": out.getvalue()}))
        """,
    )
    assert outcome["error"] is None
    assert outcome["duplicate"] is False
    # On a terminal without tqdm: no bar, and a word on the extra that draws one.
    assert 'pip install "django-idempotency[progress]"' in outcome["purge"]


def test_every_extra_is_declared() -> None:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: pytest's own TOML reader
        import tomli as tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert {"celery", "kombu", "drf", "openapi", "metrics", "progress", "nats", "sqs"} <= set(
        extras
    )
    assert any(r.startswith("drf-spectacular") for r in extras["openapi"])
    # The extras the errors name are the ones declared, and the README and docs/versions.md
    # list each of them.
    assert set(EXTRAS) == set(extras)
    readme_list = re.search(r"^# extras: (.*(?:\n#   .*)*)", (ROOT / "README.md").read_text(), re.M)
    assert readme_list, "the README lost its list of extras"
    items = re.sub(r"\([^)]*\)", "", readme_list[1].replace("\n#   ", " "))
    listed = {item.strip() for item in items.split(",")}
    assert listed == set(extras), readme_list[1]
    table = (ROOT / "docs" / "versions.md").read_text()
    rows = set(re.findall(r"^\| `([a-z]+)` \|", table, re.M))
    assert set(extras) <= rows, set(extras) - rows
    assert any(r.startswith("kombu[sqs]") for r in extras["sqs"])
    assert any(r.startswith("celery") for r in extras["sqs"])
