"""What every endpoint of the example service answers the same way, so no view has to.

* A NUL character in the URL (``/api/orders/%00/``, ``?customerId=%00``) or in a header (the
  token of ``Authorization``, the session cookie) is a 400: PostgreSQL refuses NUL in text, and
  a lookup with one would fail with a ``DataError`` (a 500).
* A ``charset`` that names a codec but not a text encoding (``zlib``, ``rot13``, ``base64``)
  is a 415: parsers would run it on the body and fail with whatever it raises (a 500).
* A body over ``DATA_UPLOAD_MAX_MEMORY_SIZE`` is a 413 on every endpoint, before a parser reads
  it: REST framework's JSON parser reads the stream itself, past Django's own check. A declared
  ``Content-Length`` is checked at once; a body without one is cut off once the limit is read.
* The database being unavailable (refused or lost connections, a pool that has no connection
  to give, a serialization failure) is a 503 with ``Retry-After``, never a 500: the request may
  be retried as it is.

Answers are ``application/problem+json`` documents, like the ``Idempotency-Key`` errors.
"""

from __future__ import annotations

import codecs
import logging
import sys
from collections.abc import Callable
from typing import Any

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.db import InterfaceError, OperationalError
from django.http import HttpRequest, HttpResponse
from django.views import defaults

from idempotency.http import problem

logger = logging.getLogger("project")

#: Seconds a client should wait before retrying while the database is unavailable.
UNAVAILABLE_RETRY_AFTER = 2


def database_unavailable(exc: BaseException | None) -> bool:
    """Whether *exc* says the database cannot serve now, rather than that the request is wrong.

    ``OperationalError`` covers refused and lost connections, the pool's timeout
    (``psycopg_pool.PoolTimeout``), serialization failures and deadlocks; ``InterfaceError`` a
    connection that was already closed.
    """
    return isinstance(exc, OperationalError | InterfaceError)


def unavailable() -> HttpResponse:
    return problem(
        503,
        "service-unavailable",
        "Service unavailable",
        "The database is unavailable; retry the same request after Retry-After seconds.",
        headers={"Retry-After": str(UNAVAILABLE_RETRY_AFTER)},
    )


def too_large(limit: int) -> HttpResponse:
    return problem(
        413,
        "payload-too-large",
        "Payload too large",
        f"A request body may be at most {limit} bytes.",
    )


def bad_request(detail: str) -> HttpResponse:
    return problem(400, "bad-request", "Bad request", detail)


class _BoundedStream:
    """A request body that raises ``RequestDataTooBig`` once more than *limit* bytes are read."""

    def __init__(self, stream: Any, limit: int) -> None:
        self._stream = stream
        self._left = limit

    def _take(self, data: bytes) -> bytes:
        self._left -= len(data)
        if self._left < 0:
            raise RequestDataTooBig("the request body is over the limit")
        return data

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            size = self._left + 1  # enough to tell "over the limit" from "at the limit"
        return self._take(self._stream.read(min(size, self._left + 1)))

    def readline(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            size = self._left + 1
        return self._take(self._stream.readline(min(size, self._left + 1)))

    def seekable(self) -> bool:
        # Forward only: Django 6.0 asks before seeking to measure a body; the bound is ours.
        return False

    def close(self) -> None:
        close = getattr(self._stream, "close", None)
        if callable(close):
            close()


def _nul_in_headers(meta: dict[str, Any]) -> bool:
    return any(
        isinstance(value, str) and "\x00" in value
        for name, value in meta.items()
        if name.startswith("HTTP_") or name in ("CONTENT_TYPE", "CONTENT_LENGTH")
    )


def _decodes_text(charset: str) -> bool:
    """Whether *charset* is a text encoding (or unknown: Django then ignores it)."""
    try:
        info = codecs.lookup(charset)
    except LookupError:
        return True
    # bytes-to-bytes (zlib, base64) and str-to-str (rot13) codecs are not text encodings.
    return bool(getattr(info, "_is_text_encoding", True))


def unsupported_charset(charset: str) -> HttpResponse:
    return problem(
        415,
        "unsupported-charset",
        "Unsupported charset",
        f"The charset {charset[:50]!r} is not a text encoding; send UTF-8.",
    )


class RequestGuardMiddleware:
    """400 for a NUL in the URL or a header, 415 for a charset that is not a text encoding,
    413 for an oversized body, 503 when the database is down."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        query = request.META.get("QUERY_STRING", "")
        if "\x00" in request.path or "%00" in query or "\x00" in query:
            return bad_request("The URL may not contain a NUL character (%00).")
        if _nul_in_headers(request.META):
            return bad_request("A request header may not contain a NUL character.")
        charset = (request.content_params or {}).get("charset")
        if charset is not None and not _decodes_text(charset):
            return unsupported_charset(charset)
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        if limit is not None:
            declared = request.META.get("CONTENT_LENGTH") or ""
            # ASCII digits only: str.isdigit() also takes "²", which int() refuses (a 500).
            if declared and not (declared.isascii() and declared.isdigit()):
                return bad_request(f"Invalid Content-Length {declared!r}.")
            if declared and int(declared) > limit:
                return too_large(limit)
            # A body whose length was not declared (chunked, or ASGI) is cut off at the limit.
            stream = getattr(request, "_stream", None)
            if stream is not None:
                request._stream = _BoundedStream(stream, limit)  # type: ignore[assignment]
        return self.get_response(request)

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        if isinstance(exception, RequestDataTooBig):
            limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
            return too_large(limit if limit is not None else 0)
        if database_unavailable(exception):
            logger.warning("database unavailable: %s %s answered 503", request.method, request.path)
            return unavailable()
        return None


def server_error(request: HttpRequest) -> HttpResponse:
    """``handler500``: a database outage outside a view (a session save, say) is a 503 too."""
    if database_unavailable(sys.exc_info()[1]):
        return unavailable()
    return defaults.server_error(request)
