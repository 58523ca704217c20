"""The settings blocks of the README and Getting started, pasted into a new project as written.

Each ```python block that begins with ``# settings.py`` is appended, in the order of the
document, to the settings.py of a fresh ``django-admin startproject``; ``manage.py check`` must
then find no issue. Django's generated settings import only ``Path``, so a block that uses a
name it does not import (``timedelta``) fails here as it fails for a new user.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.services import ROOT

BLOCK = re.compile(r"^```python\n(.*?)^```$", re.MULTILINE | re.DOTALL)
DOCUMENTS = ("README.md", "docs/getting-started.md")


def settings_blocks(document: str) -> list[str]:
    return [
        block
        for block in BLOCK.findall((ROOT / document).read_text())
        if block.startswith("# settings.py")
    ]


def check(project: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "manage.py", "check", "--fail-level", "WARNING"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
def new_project(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"DJANGO_SETTINGS_MODULE", "DATABASE_URL", "CELERY_BROKER_URL"}
    }
    # The app from this tree, as the wheel would install it; nothing else of the repository.
    (tmp_path / "site-packages").mkdir()
    (tmp_path / "site-packages" / "idempotency").symlink_to(ROOT / "idempotency")
    env["PYTHONPATH"] = str(tmp_path / "site-packages")
    project = tmp_path / "project"
    project.mkdir()
    subprocess.run(
        [sys.executable, "-m", "django", "startproject", "mysite", str(project)],
        env=env,
        check=True,
        capture_output=True,
        timeout=60,
    )
    return project, env


@pytest.mark.parametrize("document", DOCUMENTS)
def test_the_settings_blocks_paste_into_a_new_project(
    document: str, new_project: tuple[Path, dict[str, str]]
) -> None:
    project, env = new_project
    blocks = settings_blocks(document)
    assert blocks, f"{document} lost its settings block"
    settings = project / "mysite" / "settings.py"
    with settings.open("a") as out:
        for block in blocks:
            out.write("\n" + block)
    done = check(project, env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "System check identified no issues" in done.stdout
    # The blocks really were read: the app is installed and its setting taken.
    shown = subprocess.run(
        [sys.executable, "manage.py", "shell", "-c",
         "from django.conf import settings; print('idempotency' in settings.INSTALLED_APPS,"
         " settings.IDEMPOTENCY['RETENTION'].days)"],
        cwd=project, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert shown.stdout.splitlines()[-1].split() == ["True", "30"], shown.stdout + shown.stderr


def test_a_block_missing_its_import_fails_the_check(
    new_project: tuple[Path, dict[str, str]],
) -> None:
    """The check can fail: the README's block without its import is the NameError users saw."""
    project, env = new_project
    (block,) = settings_blocks("README.md")
    assert "from datetime import timedelta\n" in block
    with (project / "mysite" / "settings.py").open("a") as out:
        out.write("\n" + block.replace("from datetime import timedelta\n", ""))
    done = check(project, env)
    assert done.returncode != 0
    assert "NameError: name 'timedelta' is not defined" in done.stderr
