"""The ids of the messages a consumer emits: derived from the event it handles.

A consumer's outgoing messages are part of its effect: ``outbox.enqueue(...)`` inside the claim
stores them in the same transaction as the inbox record, and they are published after the
commit (or by the relay). Their event id is derived from the incoming one, so every delivery,
redelivery or re-publish of the incoming event emits the *same* downstream id, and the
downstream consumer's inbox discards the copies.
"""

from __future__ import annotations

import uuid
from typing import Any

from ..exceptions import IdempotencyConfigurationError
from ..keys import event_id_key

#: The namespace of derived ids (uuid5): fixed, so an id derived today is derived alike later.
DERIVED_NAMESPACE = uuid.UUID("8d3c5e2a-6f0b-5b7e-9a41-2c7d9e1f4b60")


def derived_event_id(event_id: Any, purpose: str) -> str:
    """The id of the message emitted for *purpose* (``"OrderPlaced"``) while handling *event_id*.

    A uuid5 of both: deterministic, distinct per purpose (one event may emit several
    messages), and a valid key. *event_id* is validated as an idempotency key is
    (:class:`~idempotency.exceptions.InvalidEventId`).
    """
    if not isinstance(purpose, str) or not purpose:
        raise IdempotencyConfigurationError("a derived event id needs a purpose")
    # A separator no key holds (keys refuse control characters): "a" + "bc" != "ab" + "c".
    return str(uuid.uuid5(DERIVED_NAMESPACE, f"{purpose}\x1f{event_id_key(event_id)}"))
