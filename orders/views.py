from __future__ import annotations

from typing import Any

from django.db import transaction
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import generics, status
from rest_framework.exceptions import ValidationError
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from .events import EVENT_TYPES
from .models import Order, Product
from .serializers import (
    AcceptedSerializer,
    OrderSerializer,
    PlaceOrderSerializer,
    ProductSerializer,
)


def validate_event(data: Any) -> tuple[dict[str, Any], Any]:
    """The normalised event and the task that consumes it; raises ``ValidationError``."""
    if not isinstance(data, dict):
        raise ValidationError({"non_field_errors": ["An event must be a JSON object."]})
    event_type = data.get("eventType")
    if event_type not in EVENT_TYPES:
        raise ValidationError(
            {
                "eventType": [
                    f"Unknown event type {event_type!r}; expected one of {', '.join(EVENT_TYPES)}."
                ]
            }
        )
    kind = EVENT_TYPES[event_type]
    serializer = kind.serializer(data=data)
    serializer.is_valid(raise_exception=True)
    return dict(serializer.data), kind.task


class EventView(APIView):
    """Accept an event; a Celery worker applies it once, after this request commits."""

    @extend_schema(
        request=PlaceOrderSerializer,
        responses={202: AcceptedSerializer, 400: OpenApiResponse(description="Invalid event")},
    )
    def post(self, request: Request) -> Response:
        event, task = validate_event(request.data)
        with transaction.atomic():
            # Published only once the transaction commits, never for work that rolled back.
            task.delay_on_commit(event)
        return Response(
            {"eventId": event["eventId"], "status": "accepted"}, status=status.HTTP_202_ACCEPTED
        )


class OrderDetailView(generics.RetrieveAPIView):
    queryset = Order.objects.prefetch_related("items__product")
    serializer_class = OrderSerializer
    lookup_field = "order_id"
    lookup_url_kwarg = "order_id"


class ProductDetailView(generics.RetrieveAPIView):
    queryset = Product.objects.all()
    serializer_class = ProductSerializer
    lookup_field = "product_id"
    lookup_url_kwarg = "product_id"
