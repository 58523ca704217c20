"""The API's JSON parser: REST framework's, with a bound on how deeply a body may nest, and no
lone surrogates."""

from __future__ import annotations

import re
from typing import Any

from rest_framework import parsers
from rest_framework.exceptions import ParseError

#: Far deeper than any event or order (three levels), far shallower than Python's recursion
#: limit, which a body of nested lists would otherwise hit (a RecursionError, a 500).
MAX_DEPTH = 32


def depth_of(value: Any) -> int:
    """How deeply *value* nests lists and objects (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, level)
        if deepest > MAX_DEPTH:
            break  # deep enough to refuse: no need to walk the rest
        stack.extend((child, level + 1) for child in children)
    return deepest


#: A JSON ``"\ud800"`` escape without its pair parses to a string that has no UTF-8 form:
#: it cannot be hashed (the Idempotency-Key fingerprint), stored (PostgreSQL) nor published.
_SURROGATE = re.compile("[\ud800-\udfff]")


def lone_surrogate_in(value: Any) -> bool:
    """Whether a string of *value* (a key or a value, at any depth) holds a lone surrogate."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


class JSONParser(parsers.JSONParser):
    def parse(self, stream: Any, media_type: str | None = None, parser_context: Any = None) -> Any:
        try:
            data = super().parse(stream, media_type, parser_context)
        except RecursionError as exc:
            raise ParseError(f"JSON parse error - nested deeper than {MAX_DEPTH} levels") from exc
        if depth_of(data) > MAX_DEPTH:
            raise ParseError(f"JSON parse error - nested deeper than {MAX_DEPTH} levels")
        if lone_surrogate_in(data):
            raise ParseError("JSON parse error - a string holds a lone surrogate (\\ud800-\\udfff)")
        return data
