"""The supported versions, tested: ``nox -l`` lists one session per (Python, Django) pair.

Each ``tests`` session runs the unit suite (everything but the service tests, the fault suite
and the soak) twice: on SQLite, then on PostgreSQL (``NOX_POSTGRES_URL``). The ``mariadb``
session runs it on MariaDB/MySQL (``NOX_MYSQL_URL``). docs/versions.md is the same table in
prose; tests/test_packaging.py holds the classifiers of pyproject.toml to ``MATRIX``.

    nox -s "tests-3.10(django='5.2')"      # one combination
    nox -t ci                              # the oldest and the newest (.ci/run: one database each)
"""

from __future__ import annotations

import os
from pathlib import Path

import nox

#: Django series -> the Python versions it supports that we test. Django 4.2 is not supported:
#: ``ProcessedEvent.processed_at`` takes the database's clock through ``db_default`` (5.0+).
#: Django 6.1 waits for django-celery-beat (the example project's scheduler), which caps
#: Django below 6.1.
MATRIX: dict[str, tuple[str, ...]] = {
    "5.2": ("3.10", "3.11", "3.12", "3.13"),
    "6.0": ("3.12", "3.13"),
}
#: The release installed for each series (the newest patch release: what users get).
DJANGO_REQUIREMENT = {"5.2": "Django~=5.2.0", "6.0": "Django~=6.0.0"}
OLDEST = ("3.10", "5.2")
NEWEST = ("3.13", "6.0")

POSTGRES_URL = os.environ.get("NOX_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432/idempotency")
#: NOX_DATABASES=sqlite or =postgres: one of the two runs of a ``tests`` session (.ci/run takes
#: PostgreSQL for the oldest pair and SQLite for the newest, to stay within its hour).
DATABASES = {name.strip() for name in os.environ.get("NOX_DATABASES", "sqlite,postgres").split(",")}
if unknown := DATABASES - {"sqlite", "postgres"}:
    raise SystemExit(f"NOX_DATABASES: unknown {', '.join(sorted(unknown))} (sqlite, postgres)")
MYSQL_URL = os.environ.get("NOX_MYSQL_URL", "mysql://root@127.0.0.1:3306/idempotency")
UNIT = [
    "-m",
    "not services and not faults and not soak",
    "-p",
    "no:cacheprovider",
    # It serves the docs' commands with scripts/run.sh, on the repository's .venv: not the
    # session's Python and Django.
    "--deselect",
    "tests/integration/test_docs_commands.py",
]

nox.options.default_venv_backend = "uv|virtualenv"
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = True


def _pyenv_on_path() -> None:
    """Interpreters installed by pyenv but not selected are found by their versioned names."""
    versions = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    wanted = {python for pythons in MATRIX.values() for python in pythons}
    found = []
    for python in sorted(wanted):
        candidates = sorted(versions.glob(f"{python}.*/bin/python{python}"))
        if candidates:
            found.append(str(candidates[-1].parent))
    os.environ["PATH"] = os.pathsep.join([*found, os.environ.get("PATH", "")])


_pyenv_on_path()


def _install(session: nox.Session, django: str) -> None:
    session.install("-r", "requirements/test.txt")
    session.install(DJANGO_REQUIREMENT[django])
    session.run("python", "-m", "django", "--version")


def _pytest(session: nox.Session, database_url: str | None) -> None:
    # None unsets the variable: the settings then take their SQLite default.
    session.run("pytest", "-q", *UNIT, *session.posargs, env={"DATABASE_URL": database_url})


@nox.session
@nox.parametrize(
    ("python", "django"),
    [
        nox.param(python, django, tags=["ci"] if (python, django) in (OLDEST, NEWEST) else [])
        for django, pythons in MATRIX.items()
        for python in pythons
    ],
)
def tests(session: nox.Session, django: str) -> None:
    """The unit suite on SQLite, then on PostgreSQL, for one (Python, Django) pair."""
    _install(session, django)
    if "sqlite" in DATABASES:
        _pytest(session, None)
    if "postgres" in DATABASES:
        _pytest(session, POSTGRES_URL)


@nox.session(python=NEWEST[0], tags=["mariadb"])
def mariadb(session: nox.Session) -> None:
    """The unit suite and the concurrent claims on MariaDB/MySQL, with the newest Django."""
    _install(session, NEWEST[1])
    _pytest(session, MYSQL_URL)
    session.run(
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-m",
        "services",
        "tests/idempotency/inbox/test_concurrency.py",
        env={"DATABASE_URL": MYSQL_URL, "REQUIRE_SERVICES": "1"},
    )
