"""The release artefacts: what the wheel and the sdist ship, and the metadata the index shows.

The artefacts are built once per run with ``python -m build --no-isolation`` (the pinned
hatchling of requirements/dev.txt), the same command as ``make dist``.
"""

from __future__ import annotations

import email
import email.message
import importlib.util
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
#: What the sdist carries beside the app: the whole suite and everything it runs on.
SUITE = ("tests", "project", "orders", "requirements", "scripts")
SKIPPED_PARTS = {"__pycache__", ".pytest_cache"}

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("build") is None or importlib.util.find_spec("hatchling") is None,
    reason="build and hatchling (requirements/dev.txt) are not installed",
)


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = out.glob("*.whl")
    (sdist,) = out.glob("*.tar.gz")
    return {"wheel": wheel, "sdist": sdist, "dir": out}


def _sdist_names(sdist: Path) -> set[str]:
    with tarfile.open(sdist) as archive:
        # Every member sits under one "<name>-<version>/" directory.
        return {m.name.split("/", 1)[1] for m in archive.getmembers() if m.isfile()}


def _on_disk(top: str) -> set[str]:
    return {
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / top).rglob("*")
        if path.is_file() and not SKIPPED_PARTS & set(path.parts) and path.suffix != ".pyc"
    }


def _metadata(wheel: Path) -> email.message.Message:
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        return email.message_from_bytes(archive.read(name))


CAPABILITIES = ("inbox", "http", "outbox", "deadletters")
PARTS = ("__init__", "models", "admin")


def test_wheel_ships_the_app_only(dist: dict[str, Path]) -> None:
    with zipfile.ZipFile(dist["wheel"]) as archive:
        names = archive.namelist()
    tops = {name.split("/", 1)[0] for name in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"idempotency"}
    for needed in (
        "idempotency/py.typed",
        "idempotency/migrations/0001_initial.py",
        "idempotency/management/commands/purge_processed_events.py",
        # The capabilities' subpackages, which idempotency.models and idempotency.admin import.
        *(f"idempotency/{package}/{module}.py" for package in CAPABILITIES for module in PARTS),
        "idempotency/celery/__init__.py",
        # Amazon SQS with the delivery rule kept (the sqs extra), not only in the example.
        "idempotency/celery/sqs.py",
    ):
        assert needed in names, needed
    assert any(n.startswith("idempotency/templates/") for n in names)
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]


def test_sdist_ships_the_whole_suite_or_nothing_of_it(dist: dict[str, Path]) -> None:
    names = _sdist_names(dist["sdist"])
    for top in ("idempotency", *SUITE):
        missing = _on_disk(top) - names
        assert not missing, f"{top}/ is in the sdist only in part: {sorted(missing)[:10]}"
    for single in ("manage.py", "noxfile.py", "pyproject.toml", "README.md", "LICENSE"):
        assert single in names
    assert not [n for n in names if n.startswith((".venv/", "var/", ".nox/", "dist/"))]
    assert not [n for n in names if "__pycache__" in n]


@pytest.fixture
def unpacked(dist: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    with tarfile.open(dist["sdist"]) as archive:
        archive.extractall(tmp_path, filter="data")
    (top,) = tmp_path.iterdir()
    for name in ("DATABASE_URL", "CELERY_BROKER_URL", "DJANGO_SETTINGS_MODULE"):
        monkeypatch.delenv(name, raising=False)
    return top


def test_the_suite_runs_from_an_unpacked_sdist(unpacked: Path) -> None:
    collected = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
        cwd=unpacked,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert collected.returncode == 0, collected.stdout[-3000:] + collected.stderr[-3000:]
    # The conftest files and every test module came along: the same modules as here. (Test
    # ids parametrized over what the run finds, files or settings, may differ in number.)
    here = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert here.returncode == 0, here.stdout[-3000:]

    def modules(output: str) -> set[str]:
        return {line.split("::", 1)[0] for line in output.splitlines() if "::" in line}

    assert modules(collected.stdout) == modules(here.stdout)
    assert len(modules(here.stdout)) > 50


def test_a_live_test_passes_in_an_unpacked_sdist(unpacked: Path) -> None:
    """Not only collected: a test that starts `make run`'s service (scripts/run.sh, on this
    interpreter's environment, there being no .venv) and runs a README block against it."""
    assert not (unpacked / ".venv").exists()
    ran = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "tests/integration/test_docs_commands.py::test_a_wrong_token_fails_the_commands"],
        cwd=unpacked, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    assert "1 passed" in ran.stdout


#: Where a new user reads how to install: until a release is on a package index, each installs
#: the wheel `make dist` builds, and none names a distribution pip cannot find.
INSTALL_DOCUMENTS = ("README.md", "docs/getting-started.md")


@pytest.mark.parametrize("document", INSTALL_DOCUMENTS)
def test_the_docs_install_the_wheel_make_dist_builds(dist: dict[str, Path], document: str) -> None:
    text = (ROOT / document).read_text()
    assert "make dist" in text
    assert f'pip install "dist/{dist["wheel"].name}[' in text
    assert not re.search(r"pip install \"?django-idempotency", text)


def test_twine_accepts_both(dist: dict[str, Path]) -> None:
    checked = subprocess.run(
        [sys.executable, "-m", "twine", "check", "--strict", *map(str, dist["dir"].iterdir())],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_long_description_links_are_absolute(dist: dict[str, Path]) -> None:
    metadata = _metadata(dist["wheel"])
    assert metadata["Description-Content-Type"] == "text/markdown"
    description = metadata.get_payload()
    assert isinstance(description, str)
    targets = re.findall(r"\]\(([^)\s]+)\)", description)
    assert targets, "the README lost its links"
    relative = [t for t in targets if not t.startswith(("https://", "http://", "#", "mailto:"))]
    assert not relative
    urls = dict(value.split(", ", 1) for value in metadata.get_all("Project-URL", []))
    assert {"Homepage", "Documentation", "Source", "Changelog", "Issues"} <= set(urls)
    assert all(url.startswith("https://") for url in urls.values())


def _matrix() -> dict[str, tuple[str, ...]]:
    spec = importlib.util.spec_from_file_location("noxfile", ROOT / "noxfile.py")
    assert spec
    assert spec.loader
    if importlib.util.find_spec("nox") is None:
        pytest.skip("nox (requirements/dev.txt) is not installed")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.MATRIX


def test_classifiers_and_docs_state_the_tested_matrix(dist: dict[str, Path]) -> None:
    matrix = _matrix()
    metadata = _metadata(dist["wheel"])
    classifiers = metadata.get_all("Classifier", [])
    pythons = {python for series in matrix.values() for python in series}
    stated_pythons = {
        c.rsplit(" :: ", 1)[1] for c in classifiers if re.fullmatch(r".*Python :: 3\.\d+", c)
    }
    stated_djangos = {
        c.rsplit(" :: ", 1)[1] for c in classifiers if re.fullmatch(r".*Django :: \d+\.\d+", c)
    }
    assert stated_pythons == pythons
    assert stated_djangos == set(matrix)
    oldest_python = min(pythons, key=lambda v: tuple(map(int, v.split("."))))
    assert metadata["Requires-Python"] == f">={oldest_python}"
    oldest_django = min(matrix, key=lambda v: tuple(map(int, v.split("."))))
    assert f"django>={oldest_django}" in [r.lower() for r in metadata.get_all("Requires-Dist")]

    table = (ROOT / "docs" / "versions.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| Python |"))
    assert [cell.strip() for cell in header.strip("|").split("|")][1:] == [
        f"Django {series}" + (" (LTS)" if series.endswith(".2") else "") for series in matrix
    ]
    for python in pythons:
        row = next(line for line in table.splitlines() if line.startswith(f"| {python} |"))
        cells = [cell.strip() for cell in row.strip("|").split("|")][1:]
        for series, cell in zip(matrix, cells, strict=True):
            assert cell.startswith("tested") == (python in matrix[series]), (python, series)


def _changelog() -> tuple[str, str, str]:
    """The [Unreleased] section's text, the newest released version and its date."""
    text = (ROOT / "CHANGELOG.md").read_text()
    headings = list(re.finditer(r"^## \[([^\]]+)\](?: - (\S+))?$", text, re.MULTILINE))
    assert headings[0][1] == "Unreleased", "the changelog opens with [Unreleased]"
    unreleased = text[headings[0].end() : headings[1].start()]
    assert headings[1][2], f"{headings[1][1]} has no date"
    return unreleased, headings[1][1], headings[1][2]


def test_the_version_agrees_with_the_changelog(dist: dict[str, Path]) -> None:
    """__version__, the built artefacts and CHANGELOG.md name the same release, or a
    development release after the newest one while [Unreleased] collects its changes."""
    stated = re.search(
        r'^__version__ = "([^"]+)"$', (ROOT / "idempotency" / "__init__.py").read_text(), re.M
    )
    assert stated
    version = Version(stated[1])
    assert str(version) == stated[1], "a normalised PEP 440 version"
    assert _metadata(dist["wheel"])["Version"] == str(version)
    assert dist["wheel"].name.startswith(f"django_idempotency-{version}-")
    assert dist["sdist"].name == f"django_idempotency-{version}.tar.gz"

    unreleased, released, _ = _changelog()
    if version.is_devrelease or version.is_prerelease:
        assert version > Version(released), (version, released)
        assert Version(version.base_version) > Version(released)
    else:
        assert str(version) == released, "a release is the changelog's newest entry"
        assert not re.search(r"^- ", unreleased, re.M), f"{version} is out, [Unreleased] is not"
    text = (ROOT / "CHANGELOG.md").read_text()
    assert "[Unreleased]: https://" in text
    assert re.search(rf"^\[Unreleased\]: \S+/compare/v{re.escape(released)}\.\.\.HEAD$", text, re.M)
    assert re.search(rf"^\[{re.escape(released)}\]: \S+/v{re.escape(released)}$", text, re.M)
