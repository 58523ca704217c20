"""The optional dependencies, each installed by an extra of the distribution.

``pip install "django-idempotency[celery,drf]"``; docs/versions.md lists what needs each.
"""

from __future__ import annotations

import importlib

from .exceptions import MissingExtra

#: Extra -> the distributions it installs (as pyproject.toml declares them).
EXTRAS = {
    "celery": "celery",
    "kombu": "kombu",
    "drf": "djangorestframework",
    "openapi": "drf-spectacular and djangorestframework",
    "metrics": "prometheus-client",
    "progress": "tqdm",
    "nats": "nats-py",
    "sqs": "boto3 (kombu[sqs])",
}


def missing(extra: str, needed_by: str) -> MissingExtra:
    """The error for *needed_by* (a module, a command) without the *extra* installed."""
    return MissingExtra(
        f"{needed_by} needs {EXTRAS[extra]}, which is not installed: "
        f'pip install "django-idempotency[{extra}]"'
    )


def require(extra: str, needed_by: str, *modules: str) -> None:
    """Raise :class:`MissingExtra` unless every one of *modules* imports."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise missing(extra, needed_by) from exc
