from __future__ import annotations

from typing import Any

from rest_framework.permissions import SAFE_METHODS, BasePermission
from rest_framework.request import Request

#: What writing to the API takes: posting events, placing orders.
SUBMIT_PERMISSION = "orders.submit_event"


def can_submit(request: Request) -> bool:
    user = request.user
    return bool(user and user.is_authenticated and user.has_perm(SUBMIT_PERMISSION))


class CanSubmitEvents(BasePermission):
    """Every method needs ``orders.submit_event`` (the events endpoint only takes writes)."""

    message = "Submitting events needs the orders.submit_event permission."

    def has_permission(self, request: Request, view: Any) -> bool:
        return can_submit(request)


class SubmitEventsOrReadOnly(BasePermission):
    """Reading needs a login; writing (any unsafe method) also needs ``orders.submit_event``.

    The API's default: a write endpoint added later is closed to read-only users unless its
    view says otherwise.
    """

    message = "Writing needs the orders.submit_event permission; this user may only read."

    def has_permission(self, request: Request, view: Any) -> bool:
        user = request.user
        if not (user and user.is_authenticated):
            return False
        return request.method in SAFE_METHODS or can_submit(request)
