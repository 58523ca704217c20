"""What the repository tracks: the sources, never a tool's cache or a run's output."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: Written by the tools a run uses (schemathesis's cache of crashes and examples among them).
CACHES = [".schemathesis", ".pytest_cache", ".mypy_cache", ".ruff_cache", ".nox", "var"]


def git(*args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout (an unpacked sdist)")
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)


def test_no_cache_is_tracked() -> None:
    tracked = git("ls-files", "-z").stdout.split("\0")
    assert [path for path in tracked if path.split("/")[0] in CACHES] == []


@pytest.mark.parametrize("cache", CACHES)
def test_every_cache_is_ignored(cache: str) -> None:
    assert git("check-ignore", "-q", "--no-index", f"{cache}/x").returncode == 0, cache
