"""What the schema generator cannot read from the event serializers, written into the schema."""

from __future__ import annotations

from typing import Any


def strict_events(result: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    """drf-spectacular postprocessing hook: each event's component as strict as its serializer.

    The serializers refuse a field they do not know (a misspelt ``paymentID``) and an
    ``eventType`` other than their own; without this the schema would allow both.
    """
    from .events import EVENT_TYPES

    schemas = result.get("components", {}).get("schemas", {})
    for name in EVENT_TYPES:
        component = schemas.get(name)
        if component is None:
            continue
        component["additionalProperties"] = False
        event_type = component.get("properties", {}).get("eventType")
        if event_type is not None:
            event_type["enum"] = [name]
    post = result.get("paths", {}).get("/api/events/", {}).get("post")
    if post is not None:
        _one_or_a_batch(post)
    return result


def _one_or_a_batch(post: dict[str, Any]) -> None:
    """``POST /api/events/`` takes an event or a list of them, and answers in kind."""
    from .views import MAX_BATCH

    body = post["requestBody"]
    body["required"] = True  # an empty body is a 400, never an empty event
    for content in body["content"].values():
        content["schema"] = _or_a_list(content["schema"], MAX_BATCH)
    for content in post["responses"].get("202", {}).get("content", {}).values():
        content["schema"] = _or_a_list(content["schema"], MAX_BATCH)


def _or_a_list(schema: dict[str, Any], most: int) -> dict[str, Any]:
    return {
        "oneOf": [
            schema,
            {"type": "array", "items": schema, "minItems": 1, "maxItems": most},
        ]
    }


#: Answered by project.middleware on every endpoint, whatever its view declares.
EVERY_ENDPOINT = {
    "400": "The URL (path, query or a header) holds a NUL character.",
    "503": "The database is unavailable; retry after Retry-After.",
}


def every_endpoint(result: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    """drf-spectacular postprocessing hook: the answers the middleware gives on every endpoint."""
    for operations in result.get("paths", {}).values():
        for operation in operations.values():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            for status, description in EVERY_ENDPOINT.items():
                operation["responses"].setdefault(status, {"description": description})
    return result
