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
    return result
