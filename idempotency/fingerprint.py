"""A stable hash of an event's payload, to tell a true duplicate from a reused id."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from django.core.serializers.json import DjangoJSONEncoder


def canonical_json(payload: Any) -> str:
    """The payload as JSON with sorted keys and no insignificant white space."""
    return json.dumps(
        payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False, cls=DjangoJSONEncoder
    )


def fingerprint(payload: Any) -> str:
    """The SHA-256 of :func:`canonical_json`, as 64 hex characters."""
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()
