"""The responses the key decides on: the stored one replayed, and RFC 9457 problems."""

from __future__ import annotations

import json
from collections.abc import Mapping

from django.http import HttpResponse

from ..exceptions import (
    IdempotencyKeyInUse,
    IdempotencyKeyReused,
    InvalidIdempotencyKey,
    MissingIdempotencyKey,
)
from .models import IdempotencyKey

REPLAYED_HEADER = "Idempotent-Replayed"
PROBLEM_CONTENT_TYPE = "application/problem+json"
#: The ``type`` of each problem document is this prefix and a stable name (see docs/http.md).
PROBLEM_TYPE_PREFIX = "urn:django-idempotency:problem:"

#: Response headers stored and replayed. Others (``Set-Cookie``, tracing ids) describe the
#: first exchange, not the result, and may be secret.
SAFE_REPLAY_HEADERS = (
    "Content-Type",
    "Content-Language",
    "Content-Location",
    "Location",
    "Link",
    "ETag",
    "Last-Modified",
)


def problem(
    status: int, name: str, title: str, detail: str, headers: Mapping[str, str] | None = None
) -> HttpResponse:
    """An RFC 9457 problem document."""
    body = {"type": PROBLEM_TYPE_PREFIX + name, "title": title, "status": status, "detail": detail}
    response = HttpResponse(json.dumps(body), status=status, content_type=PROBLEM_CONTENT_TYPE)
    for header, value in (headers or {}).items():
        response[header] = value
    return response


def _missing(exc: MissingIdempotencyKey) -> HttpResponse:
    return problem(400, "idempotency-key-missing", "Idempotency-Key required", str(exc))


def _invalid(exc: InvalidIdempotencyKey) -> HttpResponse:
    return problem(400, "idempotency-key-invalid", "Invalid Idempotency-Key", str(exc))


def _in_use(exc: IdempotencyKeyInUse) -> HttpResponse:
    return problem(
        409,
        "idempotency-key-in-use",
        "Request in progress",
        "A request with this Idempotency-Key is still being processed; retry later.",
        headers={"Retry-After": str(exc.retry_after)},
    )


def _reused(exc: IdempotencyKeyReused) -> HttpResponse:
    return problem(
        422,
        "idempotency-key-reused",
        "Idempotency-Key reused",
        "This Idempotency-Key was already used for a different request (method, path or "
        "body). Use a new key for a new request.",
    )


def replay(record: IdempotencyKey) -> HttpResponse:
    """The stored response again, marked as a replay."""
    assert record.response_status is not None
    response = HttpResponse(bytes(record.response_body), status=record.response_status)
    if "Content-Type" not in record.response_headers:
        del response["Content-Type"]  # HttpResponse's default was not part of the original
    for name, value in record.response_headers.items():
        response[name] = value
    response[REPLAYED_HEADER] = "true"
    return response
