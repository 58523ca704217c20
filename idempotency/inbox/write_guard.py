"""Writes to another database inside a claim, refused: they would commit apart from the inbox
record, so a redelivery after a failure would repeat them (docs/databases.md)."""

from __future__ import annotations

import re
from collections.abc import Callable
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

from django.db import connections

from ..exceptions import IdempotencyConfigurationError

if TYPE_CHECKING:
    from .claiming import idempotent

#: The statements a write guard refuses: those that change rows.
_WRITES = ("INSERT", "UPDATE", "DELETE", "MERGE", "REPLACE", "TRUNCATE", "UPSERT")
_WRITE_IN_CTE = re.compile(r"\b(?:INSERT|UPDATE|DELETE|MERGE)\b", re.IGNORECASE)
#: COPY ... FROM loads rows (COPY ... TO only reads them).
_COPY_IN = re.compile(r"\bFROM\s+(?:STDIN|PROGRAM|')", re.IGNORECASE)
#: What may precede the verb: white space, parentheses and comments (a query tagger's, a
#: hand-written statement's).
_LEADING = re.compile(r"(?:[\s(]+|/\*.*?\*/|--[^\n]*)*", re.DOTALL)
_BLANK = " \t\r\n\f\v("


def is_write(sql: str) -> bool:
    head = sql.lstrip(_BLANK)
    if head.startswith(("/*", "--")):
        head = head[_LEADING.match(head).end() :]  # type: ignore[union-attr]  # always matches
    head = head[:8].upper()
    if head.startswith(_WRITES):
        return True
    if head.startswith("WITH"):
        return _WRITE_IN_CTE.search(sql) is not None
    return head.startswith("COPY") and _COPY_IN.search(sql) is not None


class WriteGuard:
    """An execute wrapper on another database, refusing writes while a claim is open."""

    def __init__(self, claim: idempotent, alias: str) -> None:
        self.claim = claim
        self.alias = alias

    def __call__(
        self, execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any
    ) -> Any:
        if is_write(sql):
            claim = self.claim
            raise IdempotencyConfigurationError(
                f"{claim.consumer} event {claim.event_id!r}: the claim is open on database "
                f"{claim.using!r}, but this statement writes to {self.alias!r}: it would "
                "commit separately from the inbox record, so a redelivery after a failure "
                f"repeats it. Route the model to {claim.using!r} (see docs/databases.md), claim "
                f"with using={self.alias!r}, or pass allow_writes_to=({self.alias!r},). "
                f"Statement: {sql[:120]}"
            )
        return execute(sql, params, many, context)


def guard_other_databases(claim: idempotent) -> ExitStack:
    """A write guard on every database but the claim's and those it allows writes to; closing
    the stack removes them."""
    guards = ExitStack()
    try:
        for alias in connections:
            if alias != claim.using and alias not in claim.allow_writes_to:
                guards.enter_context(connections[alias].execute_wrapper(WriteGuard(claim, alias)))
    except BaseException:
        guards.close()
        raise
    return guards
