"""The event types the service accepts: each one's serializer and the task that consumes it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import serializers, tasks


@dataclass(frozen=True)
class EventType:
    serializer: type[serializers.EventSerializer]
    task: Any


EVENT_TYPES: dict[str, EventType] = {
    "PlaceOrder": EventType(serializers.PlaceOrderSerializer, tasks.place_order),
}
