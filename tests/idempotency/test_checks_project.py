"""The per-task checks fire in a project laid out as ``django-admin startproject`` makes it.

Celery's ``autodiscover_tasks()`` is lazy: a worker imports each app's ``tasks`` module when it
starts, and ``manage.py check`` would otherwise see no task at all (the example project's views
import its tasks, which hid this). Each test generates a fresh project in a temporary
directory, with the ``celery.py`` of Celery's Django guide, and runs ``manage.py check`` in a
subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("celery")

ROOT = Path(__file__).resolve().parents[2]

CELERY_PY = """\
import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "site_conf.settings")

app = Celery("site_conf")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
"""

SETTINGS_TAIL = """
INSTALLED_APPS += ["idempotency", "shop"]
CELERY_BROKER_URL = "memory://"
from datetime import timedelta
IDEMPOTENCY = {"RETENTION": timedelta(days=7)}
"""


def make_project(tmp_path: Path, tasks: str) -> Path:
    subprocess.run(
        [sys.executable, "-m", "django", "startproject", "site_conf", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    package = tmp_path / "site_conf"
    (package / "__init__.py").write_text("from .celery import app as celery_app\n")
    (package / "celery.py").write_text(CELERY_PY)
    with (package / "settings.py").open("a") as settings:
        settings.write(SETTINGS_TAIL)
    shop = tmp_path / "shop"
    shop.mkdir()
    (shop / "__init__.py").write_text("")
    (shop / "tasks.py").write_text(textwrap.dedent(tasks))
    return tmp_path


def check(project: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DJANGO_SETTINGS_MODULE",)}
    env["PYTHONPATH"] = os.pathsep.join([str(project), str(ROOT)])
    return subprocess.run(
        [sys.executable, "manage.py", "check", "--fail-level", "WARNING"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_an_early_acking_task_and_unbounded_retries_are_reported(tmp_path: Path) -> None:
    project = make_project(
        tmp_path,
        """\
        from idempotency.celery import idempotent_task

        @idempotent_task(acks_late=False)
        def early(event):
            pass

        @idempotent_task(max_retries=None)
        def forever(event):
            pass
        """,
    )
    result = check(project)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "shop.tasks.early: (idempotency.W003)" in output
    assert "idempotency.W001" in output
    assert "task 'shop.tasks.forever' retries without limit" in output


def test_a_project_of_safe_tasks_passes(tmp_path: Path) -> None:
    project = make_project(
        tmp_path,
        """\
        from idempotency.celery import idempotent_task

        @idempotent_task
        def safe(event):
            pass
        """,
    )
    result = check(project)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "System check identified no issues" in result.stdout
