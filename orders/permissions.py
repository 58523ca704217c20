from __future__ import annotations

from typing import Any

from rest_framework.permissions import BasePermission
from rest_framework.request import Request


class CanSubmitEvents(BasePermission):
    """Writing events needs ``orders.submit_event``; reading needs only a login."""

    message = "Submitting events needs the orders.submit_event permission."

    def has_permission(self, request: Request, view: Any) -> bool:
        user = request.user
        return bool(user and user.is_authenticated and user.has_perm("orders.submit_event"))
