"""The app's public import paths and its layout by capability.

Every name the documentation imports or lists in a table must keep importing, wherever the
code behind it lives; the models of each capability must register as "idempotency" models
through ``idempotency.models``, with the optional extras (Celery, DRF) absent.
"""

from __future__ import annotations

import ast
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])

#: ``from idempotency.x import a, b`` (one line or parenthesised over several).
FROM_IMPORT = re.compile(r"^\s*from (idempotency(?:\.\w+)*) import (\([^)]*\)|[^\n]+)", re.M)
#: ``idempotency.x.y`` in prose or code; not a system check id (``idempotency.E001``, ``E0xx``).
DOTTED = re.compile(r"(?<![\w-])idempotency(?:\.(?![EW][\dx]{3}\b)[A-Za-z_]\w*)+")
#: ``"idempotency.celery:DeadLetterConsumer"``: a dotted path as settings name it.
COLON_PATH = re.compile(r"(?<![\w-])(idempotency(?:\.\w+)*):(\w+)")
#: ``outbox.enqueue(...)`` after ``from idempotency import outbox``: the module's names in use.
MODULE_ATTRIBUTE = r"(?<![\w.]){module}\.([A-Za-z_]\w*)\("
#: ``## Signals (`idempotency.signals`)``: a heading naming the module its tables list.
MODULE_HEADING = re.compile(r"^#+ .*\(`(idempotency(?:\.\w+)*)`\)\s*$")
#: ``| `idempotency/inbox/` |`` or ``| `idempotency/tasks.py` |``: a row of a layout table.
LAYOUT_PATH = re.compile(r"^`(idempotency(?:/\w+)*(?:/|\.py))`$")
#: A backticked name in a table: ``extract_key(event, spec)``, ``.purge``; not a setting or SQL
#: word in capitals (``DELIVERY_LIMIT``, ``NOWAIT``) where the layout mentions one.
TABLE_NAME = re.compile(r"^(\.?)([A-Za-z_]\w*)(?:\(.*\))?$")


def _table_rows(text: str) -> list[tuple[str | None, list[str]]]:
    """Each table row below its separator, with the module its nearest heading names."""
    rows: list[tuple[str | None, list[str]]] = []
    module: str | None = None
    for line in text.splitlines():
        if line.startswith("#"):
            heading = MODULE_HEADING.match(line)
            module = heading.group(1) if heading else None
        elif line.startswith("|") and not re.fullmatch(r"[|\s:-]+", line):
            rows.append((module, [cell.strip() for cell in line.strip().strip("|").split("|")]))
    return rows


def _layout_names(path: str, cells: list[str]) -> set[str]:
    """The names a layout row places in each file: ```claiming.py`: `idempotent`, ...``."""
    base = path.removesuffix(".py").removesuffix("/").replace("/", ".")
    module, last, names = base, "", set()
    for token in re.findall(r"`([^`]+)`", " ".join(cells)):
        if re.fullmatch(r"(\w+/)*\w+\.py", token) and path.endswith("/"):
            inside = token.removesuffix(".py").removesuffix("__init__").strip("/")
            module = ".".join([base, *([inside.replace("/", ".")] if inside else [])])
            last = ""
        elif (found := TABLE_NAME.match(token)) and not found.group(2).isupper():
            attribute, name = found.groups()
            if attribute and last:
                names.add(f"{module}.{last}.{name}")
            elif not attribute:
                names.add(f"{module}.{name}")
                last = name
    return names


def table_names(text: str) -> set[str]:
    """The names a document's tables list, dotted: the first column of each table under a
    heading that names its module, and every name a layout row places in a file."""
    names: set[str] = set()
    for module, cells in _table_rows(text):
        for at, cell in enumerate(cells):
            if layout := LAYOUT_PATH.match(cell):
                names |= _layout_names(layout.group(1), cells[at + 1 :])
                break
        else:
            first = re.match(r"`([^`]+)`", cells[0])
            if module and first and (found := TABLE_NAME.match(first.group(1))):
                names.add(f"{module}.{found.group(2)}")
    return names


def documented_names() -> set[str]:
    """Every ``idempotency`` name the README and docs/*.md import, cite or list in a table,
    dotted."""
    names: set[str] = set()
    for document in DOCUMENTS:
        text = document.read_text(encoding="utf-8")
        for module, imported in FROM_IMPORT.findall(text):
            for alias in re.sub(r"#[^\n]*", "", imported).strip().strip("()").split(","):
                name = alias.split(" as ")[0].strip()
                if not name:
                    continue
                names.add(f"{module}.{name}")
                if module == "idempotency":
                    for attribute in re.findall(MODULE_ATTRIBUTE.format(module=name), text):
                        names.add(f"{module}.{name}.{attribute}")
        names.update(match.rstrip(".") for match in DOTTED.findall(text))
        names.update(f"{module}.{name}" for module, name in COLON_PATH.findall(text))
        names |= table_names(text)
    return names


def resolve(dotted: str) -> Any:
    """The object *dotted* names: the longest importable module, then attributes."""
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        try:
            found: Any = importlib.import_module(".".join(parts[:split]))
        except ModuleNotFoundError as exc:
            if exc.name is None or not dotted.startswith(exc.name):
                raise
            continue
        for attribute in parts[split:]:
            found = getattr(found, attribute)
        return found
    raise ModuleNotFoundError(dotted)


def test_the_documentation_is_parsed_for_the_names_it_imports() -> None:
    names = documented_names()
    # The primitives every guide starts from; if the parsing missed these it misses others.
    assert {
        "idempotency.inbox.idempotent",
        "idempotency.http.idempotent_request",
        "idempotency.outbox.enqueue",
        "idempotency.celery.idempotent_task",
        "idempotency.models.IdempotencyKey",
        "idempotency.models.retention_cutoffs",
        "idempotency.celery.DeadLetterConsumer",
    } <= names
    assert not any(re.search(r"\.[EW][\dx]{3}$|#", name) for name in names)


def test_the_reference_tables_are_parsed_for_the_names_they_list() -> None:
    names = table_names((ROOT / "docs" / "reference.md").read_text(encoding="utf-8"))
    assert {
        # The first column of a table under its module's heading.
        "idempotency.exceptions.IdempotencyKeyReused",
        "idempotency.signals.outbox_unresolved",
        "idempotency.fingerprint.digest_hex",
        "idempotency.transient.TRANSIENT_ERRORS",
        # A layout row, file by file; a method after the class it belongs to.
        "idempotency.inbox.retention.retention_cutoffs",
        "idempotency.inbox.models.ProcessedEventQuerySet.purge",
        "idempotency.outbox.publish.publisher",
        "idempotency.clock.database_now",
        "idempotency.celery.consumer.DeadLetterConsumer",
    } <= names
    assert len(names) >= 80
    # Settings and SQL words in capitals are not names; the check ids sit under no module.
    assert not any(re.search(r"\.(DELIVERY_LIMIT|NOWAIT)$|\.[EW]\d{3}$", n) for n in names)


@pytest.mark.parametrize("dotted", sorted(documented_names()))
def test_every_documented_name_imports(dotted: str) -> None:
    assert resolve(dotted) is not None


@pytest.mark.parametrize(
    "dotted",
    [
        "idempotency.inbox.idempotent",
        "idempotency.http.idempotent_request",
        "idempotency.outbox.enqueue",
        "idempotency.models.ProcessedEvent",
        "idempotency.models.IdempotencyKey",
        "idempotency.models.OutboxMessage",
        "idempotency.models.DeadLetter",
        "idempotency.models.DeliveryAttempt",
    ],
)
def test_the_public_paths_stay_put(dotted: str) -> None:
    assert resolve(dotted) is not None


@pytest.mark.parametrize(
    "package",
    ["idempotency.inbox", "idempotency.http", "idempotency.outbox", "idempotency.deadletters"],
)
def test_a_capability_exports_what_it_lists(package: str) -> None:
    face = importlib.import_module(package)
    for name in face.__all__:
        assert getattr(face, name) is not None, name
        assert name in dir(face)
    assert set(face.__all__) == set(face._PUBLIC)
    with pytest.raises(AttributeError, match="no_such_name"):
        face.no_such_name  # noqa: B018


def test_the_models_register_under_the_app_label_with_their_tables() -> None:
    from django.apps import apps

    from idempotency import models

    registered = {
        model.__name__: model for model in apps.get_app_config("idempotency").get_models()
    }
    assert set(registered) == {
        "ProcessedEvent",
        "IdempotencyKey",
        "OutboxMessage",
        "DeadLetter",
        "DeliveryAttempt",
        "Event",  # the admin index's entry for the per-event pages: a proxy of the inbox
    }
    for name, model in registered.items():
        assert getattr(models, name) is model
        assert model._meta.app_label == "idempotency"
        table = model._meta.concrete_model.__name__.lower()
        assert model._meta.db_table == f"idempotency_{table}"


WITHOUT_EXTRAS = """
import sys
sys.modules["celery"] = None  # importing them raises ImportError
sys.modules["rest_framework"] = None
import django
from django.conf import settings
settings.configure(
    INSTALLED_APPS=[
        "django.contrib.admin", "django.contrib.auth", "django.contrib.contenttypes",
        "django.contrib.messages", "django.contrib.sessions", "idempotency",
    ],
    DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}},
)
django.setup()
from django.apps import apps
from django.contrib import admin
import idempotency.admin
import idempotency.outbox
print(sorted(m.__name__ for m in apps.get_app_config("idempotency").get_models()))
print(sorted(m.__name__ for m in admin.site._registry if m._meta.app_label == "idempotency"))
from django.core.checks import run_checks
print(sorted(str(m.id) for m in run_checks() if str(m.id).startswith("idempotency")))
"""


def test_the_models_and_admin_load_without_celery_or_drf() -> None:
    """Celery and DRF are optional extras: an inbox-only project must still start and pass its
    system checks."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("DJANGO_SETTINGS_MODULE", None)
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_EXTRAS],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    models, admins, checks = (ast.literal_eval(line) for line in done.stdout.splitlines())
    assert models == [
        "DeadLetter",
        "DeliveryAttempt",
        "Event",
        "IdempotencyKey",
        "OutboxMessage",
        "ProcessedEvent",
    ]
    assert admins == ["DeadLetter", "Event", "IdempotencyKey", "OutboxMessage", "ProcessedEvent"]
    assert checks == []  # every system check runs, Celery's part left out


# --- Layering: shared pieces below the capabilities, the integrations and faces above -------

APP = ROOT / "idempotency"
CAPABILITIES = ("inbox", "http", "outbox", "deadletters")
#: Modules every capability may build on; they import no capability.
SHARED = (
    "admin_base",
    "clock",
    "conf",
    "entities",
    "exceptions",
    "extras",
    "faces",
    "fields",
    "fingerprint",
    "keys",
    "metrics",
    "signals",
    "transient",
)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _import_nodes(tree: ast.Module, when: str) -> list[ast.Import | ast.ImportFrom]:
    """The import statements of a module that run *when*: ``"load"`` (when it is imported:
    top-level ones, also inside a top-level ``try`` or ``if``), ``"typing"`` (under ``if
    TYPE_CHECKING``), ``"called"`` (inside a function) or ``"any"``."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST, context: str) -> None:
        if isinstance(node, ast.Import | ast.ImportFrom):
            if when in (context, "any"):
                found.append(node)
            return
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            context = "called"
        if _is_type_checking(node) and context == "load":
            assert isinstance(node, ast.If)
            for child in node.body:
                visit(child, "typing")
            for child in node.orelse:
                visit(child, context)
            return
        for child in ast.iter_child_nodes(node):
            visit(child, context)

    visit(tree, "load")
    return found


def _imports(path: Path, *, when: str = "any") -> set[str]:
    """The idempotency modules *path* imports *when* (see :func:`_import_nodes`); a name
    imported from a package counts as the submodule when there is one."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path.parent)
    found: set[str] = set()
    for node in _import_nodes(tree, when):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("idempotency"))
        else:
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            if not target.startswith("idempotency"):
                continue
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                as_path = ROOT / candidate.replace(".", "/")
                is_module = (
                    as_path.with_suffix(".py").exists() or (as_path / "__init__.py").exists()
                )
                found.add(candidate if is_module else target)
    return found


def _app_modules() -> dict[str, Path]:
    return {
        _module_name(path): path for path in APP.rglob("*.py") if "migrations" not in path.parts
    }


def _group(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_each_capability_is_a_package_with_its_model_and_admin() -> None:
    for capability in CAPABILITIES:
        for part in ("__init__", "models", "admin"):
            assert (APP / capability / f"{part}.py").is_file(), f"{capability}/{part}.py"


def test_no_import_runs_back_up() -> None:
    """Shared modules import no capability; a capability imports shared modules and other
    capabilities' modules, never the faces (models, admin) or the integrations above."""
    wrong = []
    for module, path in _app_modules().items():
        group = _group(module)
        for target in _imports(path):
            into = _group(target)
            if into == group:
                continue
            if group in SHARED and into not in SHARED:
                wrong.append(f"{module} -> {target}")
            if group in CAPABILITIES and into not in (*SHARED, *CAPABILITIES):
                wrong.append(f"{module} -> {target}")
    assert not wrong, wrong


#: When an import between capabilities runs, as the table of docs/reference.md says it.
WHEN = {"at load": "load", "when called": "called", "for typing": "typing"}


def _capability_module(path: str) -> str:
    """``inbox/models.py`` -> ``idempotency.inbox.models``; ``outbox`` -> ``idempotency.outbox``."""
    return ".".join(["idempotency", *path.removesuffix(".py").split("/")])


def documented_capability_imports() -> set[tuple[str, str, str]]:
    """(importer, imported, when) for each row of the reference's table of imports between
    capabilities: ``| `inbox/models.py` | `outbox/reconciling.py` | when called | ... |``."""
    text = (ROOT / "docs" / "reference.md").read_text(encoding="utf-8")
    found: set[tuple[str, str, str]] = set()
    for _module, cells in _table_rows(text):
        if len(cells) < 3 or cells[2] not in WHEN:
            continue
        for source in re.findall(r"`([\w/.]+)`", cells[0]):
            for target in re.findall(r"`([\w/.]+)`", cells[1]):
                found.add((_capability_module(source), _capability_module(target), WHEN[cells[2]]))
    return found


def capability_imports() -> set[tuple[str, str, str]]:
    """(importer, imported, when) for each import from one capability into another."""
    found: set[tuple[str, str, str]] = set()
    for module, path in _app_modules().items():
        if _group(module) not in CAPABILITIES:
            continue
        for when in WHEN.values():
            for target in _imports(path, when=when):
                if _group(target) in CAPABILITIES and _group(target) != _group(module):
                    found.add((module, target, when))
    return found


def test_the_capabilities_import_each_other_only_as_the_reference_says() -> None:
    """docs/reference.md lists every import between capabilities and when it runs: a new one
    (or one moved to load time) fails here until the table says why."""
    documented, actual = documented_capability_imports(), capability_imports()
    assert len(documented) >= 7, "the table was not found"
    assert actual == documented, {
        "not in docs/reference.md": sorted(actual - documented),
        "no longer in the code": sorted(documented - actual),
    }
    # Loading runs one way between capabilities too: none reaches itself through the others.
    reach = {
        c: {_group(t) for s, t, w in actual if w == "load" and _group(s) == c} for c in CAPABILITIES
    }
    for _ in CAPABILITIES:
        reach = {c: set().union(to, *(reach[t] for t in to)) for c, to in reach.items()}
    assert not [c for c, to in reach.items() if c in to], reach


def test_no_import_cycles() -> None:
    graph = {
        module: {t for t in _imports(path, when="load") if t != module}
        for module, path in _app_modules().items()
    }
    done: set[str] = set()
    cycles: list[list[str]] = []

    def visit(module: str, trail: list[str]) -> None:
        if module in trail:
            cycles.append([*trail[trail.index(module) :], module])
            return
        if module in done:
            return
        for target in sorted(graph.get(module, ())):
            visit(target, [*trail, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])
    assert not cycles, cycles
    assert graph["idempotency.models"] >= {f"idempotency.{c}.models" for c in CAPABILITIES}


def test_the_app_imports_nothing_from_the_example_project() -> None:
    for path in APP.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"^\s*(from|import) (orders|project)\b", text, re.M), path
