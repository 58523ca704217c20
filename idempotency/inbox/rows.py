"""A claim's row read as Django reads one: the model's converters applied to what a statement
returned, without going through a QuerySet (the claim statements are raw SQL)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

from django.db import connections, models

from .models import ProcessedEvent


@lru_cache(maxsize=1)
def row_fields() -> tuple[models.Field, ...]:
    return tuple(ProcessedEvent._meta.concrete_fields)


@lru_cache(maxsize=1)
def _attnames() -> list[str]:
    return [f.attname for f in row_fields()]


@lru_cache(maxsize=8)
def _converters(
    using: str, vendor: str
) -> tuple[tuple[int, Any, tuple[Callable[..., Any], ...]], ...]:
    """The columns Django's compiler would convert: (position, expression, converters)."""
    connection = connections[using]
    result = []
    for index, field in enumerate(row_fields()):
        col = field.get_col(ProcessedEvent._meta.db_table)
        converters = (*connection.ops.get_db_converters(col), *col.get_db_converters(connection))
        if converters:
            result.append((index, col, converters))
    return tuple(result)


def _record(using: str, row: Sequence[Any]) -> ProcessedEvent:
    connection = connections[using]
    values = list(row)
    for index, col, converters in _converters(using, connection.vendor):
        value = values[index]
        for converter in converters:
            value = converter(value, col, connection)
        values[index] = value
    return ProcessedEvent.from_db(using, _attnames(), values)


def _converted(using: str, attname: str, value: Any) -> Any:
    """*value*, as read from the column of *attname*, converted as Django would read it."""
    connection = connections[using]
    position = _attnames().index(attname)
    for index, col, converters in _converters(using, connection.vendor):
        if index == position:
            for converter in converters:
                value = converter(value, col, connection)
    return value


class StoredRecord:
    """A duplicate's row as its select returned it: calling it builds the record; :meth:`value`
    reads one field without building it (a duplicate discarded needs only its stored result).
    """

    __slots__ = ("row", "using")

    def __init__(self, using: str, row: Sequence[Any]) -> None:
        self.using = using
        self.row = row

    def __call__(self) -> ProcessedEvent:
        return _record(self.using, self.row)

    def value(self, attname: str) -> Any:
        """The field *attname* as the record would hold it (its converters applied)."""
        return _converted(self.using, attname, self.row[_attnames().index(attname)])


def read_processed_at(using: str, value: Any) -> Any:
    """A ``processed_at`` returned by the insert, converted as Django would read it."""
    return _converted(using, "processed_at", value)
