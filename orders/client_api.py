"""The client-facing order command: ``POST /api/orders/`` with an ``Idempotency-Key``.

Clients that call plain REST endpoints, and retry on a timeout, do not mint event ids. The key
does it for them: ``uuid5(owner, key)`` becomes the PlaceOrder event's id, so an HTTP retry,
the Celery task that applies the event and the order's ``original_event_id`` all name the same
thing. A retry within the key's retention replays the first 202; after it, the order itself
(unique on ``original_event_id``) still refuses a second one, and the view does not publish
the event again.
"""

from __future__ import annotations

import uuid
from typing import Any

from django.urls import reverse
from django.utils import timezone
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import serializers, status
from rest_framework.exceptions import NotFound
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from idempotency import outbox
from idempotency.http import (
    PROBLEM_CONTENT_TYPE,
    KeyScope,
    current_scope,
    default_owner,
    idempotent_request,
)
from idempotency.models import IdempotencyKey, Outcome, ProcessedEvent
from idempotency.openapi import (
    ProblemSerializer,
    idempotency_key_parameter,
    idempotency_response_headers,
    problem_responses,
)

from . import tasks, views
from .models import Order, Rejection
from .permissions import SubmitEventsOrReadOnly
from .serializers import OrderSerializer, id_field, order_lines

#: Fixed for good: changing it would give every existing key a new event id (and a new order).
CLIENT_REQUEST_NAMESPACE = uuid.UUID("6b114c3b-0e01-4b72-8f20-3c8529c75830")

PENDING = "pending"


def client_request_id(scope: KeyScope) -> uuid.UUID:
    """The event id of the request made with this key: the same for every retry."""
    return uuid.uuid5(CLIENT_REQUEST_NAMESPACE, f"{scope.owner}\n{scope.key}")


def order_id_for(request_id: uuid.UUID) -> str:
    """The order's id, derived from the request id so that a replay names the same order."""
    return f"ORD-{request_id.hex[:20]}"


def status_path(request_id: uuid.UUID) -> str:
    return reverse("orders:order-request", kwargs={"request_id": request_id})


class OrderRequestSerializer(serializers.Serializer):
    customerId = id_field()  # noqa: N815 (the wire format is camelCase)
    items = order_lines()


class OrderRequestAcceptedSerializer(serializers.Serializer):
    requestId = serializers.UUIDField()  # noqa: N815
    orderId = serializers.CharField()  # noqa: N815
    status = serializers.ChoiceField(choices=[PENDING])
    statusUrl = serializers.CharField(help_text="Poll it for the outcome.")  # noqa: N815


class OrderRequestStatusSerializer(serializers.Serializer):
    requestId = serializers.UUIDField()  # noqa: N815
    status = serializers.ChoiceField(choices=[PENDING, *Order.Status.values])
    reason = serializers.CharField(allow_blank=True)
    order = OrderSerializer(allow_null=True)


def place_order_event(request_id: uuid.UUID, data: dict[str, Any]) -> dict[str, Any]:
    """The PlaceOrder event of a client's request, in the wire format of ``/api/events/``."""
    return {
        "eventType": "PlaceOrder",
        "eventId": str(request_id),
        "orderId": order_id_for(request_id),
        "customerId": data["customerId"],
        "items": [
            {"productId": item["productId"], "quantity": item["quantity"]} for item in data["items"]
        ],
        "timestamp": timezone.now().isoformat(),
    }


def already_placed(request_id: uuid.UUID) -> bool:
    """Whether the event was applied, so it must not be published again.

    Not a guard against a race (the order's unique event id is): it avoids re-publishing,
    after the key expired, an event whose new timestamp the inbox would take for a reused id.
    """
    return (
        Order.objects.filter(original_event_id=request_id).exists()
        or ProcessedEvent.objects.filter(
            consumer=tasks.place_order.name, event_id=str(request_id)
        ).exists()
    )


# POST places an order; a Celery worker applies it once, after this request commits. (No
# docstring: the schema would show it on the GET of the view this is mixed into.)
class PlaceOrderMixin:
    @extend_schema(
        operation_id="orders_place",
        summary="Place an order",
        description=(
            "Requires an Idempotency-Key: a retry with the same key and body gets the first "
            "response again (Idempotent-Replayed: true) and places no second order. The order "
            "is placed by a worker after the request commits; poll the Location for it."
        ),
        request=OrderRequestSerializer,
        parameters=[
            idempotency_key_parameter(required=True),
            OpenApiParameter(
                "Location",
                # A path on this server, not an absolute URI.
                {"type": "string", "format": "uri-reference"},
                OpenApiParameter.HEADER,
                description="The status URL of the request.",
                response=[202],
            ),
            *idempotency_response_headers(202, 400),
        ],
        responses={
            202: OpenApiResponse(
                OrderRequestAcceptedSerializer,
                description="Accepted; a retry with the same key gets this response again.",
            ),
            (400, "application/json"): OpenApiResponse(
                OpenApiTypes.OBJECT,
                description=(
                    "An invalid order (application/json: the errors of each field), or a "
                    "missing or malformed Idempotency-Key (application/problem+json)."
                ),
            ),
            **problem_responses(400, 409, 422, 503),
            (403, "application/json"): OpenApiResponse(
                description="Lacks the orders.submit_event permission"
            ),
            (413, PROBLEM_CONTENT_TYPE): OpenApiResponse(
                ProblemSerializer, description="Request body over 1 MiB"
            ),
        },
    )
    @idempotent_request(required=True)
    def post(self, request: Request) -> Response:
        serializer = OrderRequestSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        scope = current_scope(request)
        assert scope is not None  # the decorator requires a key
        request_id = client_request_id(scope)
        if not already_placed(request_id):
            # Stored in the transaction of the stored response, published after its commit.
            event = place_order_event(request_id, serializer.data)
            outbox.enqueue(tasks.place_order, [event], event_id=event["eventId"])
        location = status_path(request_id)
        body = {
            "requestId": str(request_id),
            "orderId": order_id_for(request_id),
            "status": PENDING,
            "statusUrl": location,
        }
        return Response(body, status=status.HTTP_202_ACCEPTED, headers={"Location": location})


# /api/orders/: GET lists the orders, POST places one. One view for both methods because a URL
# pattern matches whatever the method; no docstring, so the list keeps its own description.
class OrdersView(PlaceOrderMixin, views.OrderListView):
    # Anyone signed in lists orders; placing one needs orders.submit_event, like posting events.
    permission_classes = [SubmitEventsOrReadOnly]


class OrderRequestView(APIView):
    """The outcome of a ``POST /api/orders/``: pending, then the order or why it was rejected."""

    @extend_schema(
        operation_id="orders_request_status",
        parameters=[
            OpenApiParameter(
                "Retry-After",
                OpenApiTypes.INT,
                OpenApiParameter.HEADER,
                description="Sent while pending: seconds before polling again.",
                response=[200],
            ),
        ],
        responses={
            200: OrderRequestStatusSerializer,
            404: OpenApiResponse(description="No such request (of yours)."),
        },
    )
    def get(self, request: Request, request_id: uuid.UUID) -> Response:
        order = (
            Order.objects.prefetch_related("items__product")
            .filter(original_event_id=request_id)
            .first()
        )
        if order is not None:
            return self._answer(request_id, order.status, order.reason, order)
        rejection = Rejection.objects.filter(original_event_id=request_id).first()
        if rejection is not None:
            # Rejected before any order row existed (its order id was taken).
            return self._answer(request_id, Order.Status.REJECTED, rejection.reason)
        record = ProcessedEvent.objects.filter(
            consumer=tasks.place_order.name, event_id=str(request_id)
        ).first()
        if record is not None and record.outcome == Outcome.REJECTED:
            return self._answer(request_id, Order.Status.REJECTED, record.reason)
        if record is None and self._requested_by_caller(request, request_id):
            response = self._answer(request_id, PENDING, "")
            response["Retry-After"] = "1"
            return response
        raise NotFound("No such order request.")

    @staticmethod
    def _requested_by_caller(request: Request, request_id: uuid.UUID) -> bool:
        # Only the client that made a request learns that it is pending: its key's response.
        return (
            IdempotencyKey.objects.for_owner(default_owner(request))
            .filter(response_headers__Location=status_path(request_id))
            .exists()
        )

    @staticmethod
    def _answer(
        request_id: uuid.UUID, state: str, reason: str, order: Order | None = None
    ) -> Response:
        body = {
            "requestId": str(request_id),
            "status": state,
            "reason": reason,
            "order": OrderSerializer(order).data if order is not None else None,
        }
        return Response(body)
