"""A test-only API for the generic ``Idempotency-Key`` behaviour (``@pytest.mark.urls``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.urls import path
from rest_framework import status
from rest_framework.exceptions import ValidationError
from rest_framework.permissions import AllowAny, IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from idempotency.http import current_scope, idempotent_request
from orders.models import Customer

#: Called inside the view, after the key is locked and before the writes; tests set it.
hooks: dict[str, Callable[[], None] | None] = {"inside": None}
calls: list[str] = []


class Failure(Exception):
    pass


def widget(request: Request) -> Response:
    """Create a Customer named in the body; ``outcome`` picks how the request ends."""
    calls.append(f"{request.method} {request.path}")
    inside = hooks["inside"]
    if inside is not None:
        inside()
    outcome = request.data.get("outcome", "created")
    if outcome == "invalid":
        raise ValidationError({"name": ["This name is not allowed."]})
    customer, created = Customer.objects.get_or_create(customer_id=request.data["name"])
    if outcome == "crash":
        raise Failure("the view failed after its write")
    if outcome == "unavailable":
        return Response({"detail": "try later"}, status=status.HTTP_503_SERVICE_UNAVAILABLE)
    scope = current_scope(request)
    response = Response(
        {
            "id": customer.pk,
            "name": customer.customer_id,
            "created": created,
            "key": scope.key if scope else None,
        },
        status=status.HTTP_201_CREATED,
        headers={"Location": f"/widgets/{customer.pk}/", "X-Trace": f"trace-{len(calls)}"},
    )
    response.set_cookie("session-ish", "secret")
    return response


class WidgetsView(APIView):
    # Any signed-in user: these views test keys, not the example's write permission.
    permission_classes = [IsAuthenticated]

    @idempotent_request(required=True)
    def post(self, request: Request) -> Response:
        return widget(request)


class WidgetView(APIView):
    permission_classes = [IsAuthenticated]

    @idempotent_request
    def patch(self, request: Request, pk: int) -> Response:
        return widget(request)


class AnonymousWidgetsView(APIView):
    permission_classes = [AllowAny]

    @idempotent_request(required=True)
    def post(self, request: Request) -> Response:
        return widget(request)


def long_owner(request: Request) -> str:
    """An owner function whose owners are longer than the 150-character column."""
    return "tenant:" + "t" * 300 + f":user:{request.user.pk}"


class LongOwnerWidgetsView(APIView):
    permission_classes = [IsAuthenticated]

    @idempotent_request(required=True, owner=long_owner)
    def post(self, request: Request) -> Response:
        return widget(request)


def reset() -> None:
    hooks["inside"] = None
    calls.clear()


urlpatterns: list[Any] = [
    path("widgets/", WidgetsView.as_view()),
    path("widgets/<int:pk>/", WidgetView.as_view()),
    path("anonymous-widgets/", AnonymousWidgetsView.as_view()),
    path("long-owner-widgets/", LongOwnerWidgetsView.as_view()),
]
