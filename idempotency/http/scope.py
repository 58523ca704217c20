"""Reading a request: its ``Idempotency-Key``, its owner and endpoint, its fingerprint."""

from __future__ import annotations

# The drf extra: without it, say which to install rather than fail on a bare import.
try:
    import rest_framework  # noqa: F401
except ImportError as _exc:
    from ..extras import missing

    raise missing("drf", "idempotency.http") from _exc

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from django.core.files.uploadedfile import UploadedFile
from django.utils.datastructures import MultiValueDict
from rest_framework.exceptions import NotAuthenticated
from rest_framework.request import Request

from ..exceptions import (
    IdempotencyConfigurationError,
    InvalidIdempotencyKey,
)
from ..fingerprint import canonical_json, fingerprint
from .models import IdempotencyKey

HEADER = "Idempotency-Key"
MAX_KEY_LENGTH = 255


@dataclass(frozen=True)
class KeyScope:
    """Whose key it is and where it was used: the unique identity of a key record."""

    owner: str
    endpoint: str
    key: str


def parse_key(value: str | None) -> str | None:
    """The key in an ``Idempotency-Key`` header value, or ``None`` when there is no header.

    The draft makes the value a Structured Field string (``"abc"``); a bare token (``abc``), as
    most clients send, is accepted too. Raises :class:`InvalidIdempotencyKey`.
    """
    if value is None:
        return None
    key = value.strip()
    if len(key) >= 2 and key[0] == key[-1] == '"':
        key = key[1:-1].replace('\\"', '"').replace("\\\\", "\\")
    if not key:
        raise InvalidIdempotencyKey("the Idempotency-Key header is empty")
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidIdempotencyKey(
            f"the Idempotency-Key is {len(key)} characters long; at most {MAX_KEY_LENGTH}"
        )
    if not all("!" <= char <= "~" for char in key):
        raise InvalidIdempotencyKey(
            "the Idempotency-Key may contain only visible ASCII characters (no spaces)"
        )
    return key


def default_owner(request: Request) -> str:
    """The authenticated user: keys of different users never meet."""
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        # A key shared by every anonymous client would replay one client's response to another.
        raise NotAuthenticated("An Idempotency-Key needs an authenticated client.")
    return f"user:{user.pk}"


def endpoint_of(request: Request) -> str:
    """The method and the URL route (the pattern, so ``/orders/1/`` and ``/orders/2/`` share).

    Past 255 characters the tail is replaced by the SHA-256 of the whole: still unique.
    """
    match = getattr(request, "resolver_match", None)
    route = getattr(match, "route", None) or request.path_info
    return IdempotencyKey.stored_endpoint(f"{request.method} {route}")


def owner_of(request: Request, owner: Callable[[Request], str]) -> str:
    """What *owner* returns for *request*, as stored: past 150 characters, hashed like an
    endpoint (stable, so every retry finds its key, and unique)."""
    value = owner(request)
    if not isinstance(value, str):
        raise IdempotencyConfigurationError(
            f"the owner function {owner!r} must return a string, not {value!r}"
        )
    return IdempotencyKey.stored_owner(value)


def _canonical(value: Any) -> Any:
    """Parsed request data as plain JSON values; form data and uploads have no JSON form."""
    if isinstance(value, MultiValueDict):
        return {name: [_canonical(v) for v in value.getlist(name)] for name in value}
    if isinstance(value, UploadedFile):
        return {"file": value.name, "size": value.size, "contentType": value.content_type}
    if isinstance(value, Mapping):
        return {str(name): _canonical(v) for name, v in value.items()}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    return value


def request_fingerprint(request: Request) -> str:
    """SHA-256 of the method, the path with its query and the canonical body.

    The body is compared as parsed data, so key order and white space do not make a retry a
    different request.
    """
    payload = {
        "method": request.method,
        "path": request.get_full_path(),
        "body": _canonical(request.data),
    }
    try:
        return fingerprint(payload)
    except UnicodeEncodeError:
        # A lone surrogate (a JSON "\ud800" escape) has no UTF-8 form; whether the request is
        # valid is the view's to say, and its retries must still hash alike.
        text = canonical_json(payload).encode("utf-8", "surrogatepass")
        return hashlib.sha256(text).hexdigest()


def current_scope(request: Request) -> KeyScope | None:
    """The key of the request being handled by an :func:`idempotent_request` view, if any."""
    scope: KeyScope | None = getattr(request, "idempotency_scope", None)
    return scope
