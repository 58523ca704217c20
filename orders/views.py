from __future__ import annotations

from typing import Any

from django.db import transaction
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiParameter,
    OpenApiResponse,
    PolymorphicProxySerializer,
    extend_schema,
    extend_schema_view,
)
from rest_framework import generics, status
from rest_framework.exceptions import NotFound, ValidationError
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.reverse import reverse
from rest_framework.views import APIView

from idempotency import outbox
from idempotency.models import DeadLetter, OutboxMessage, Outcome, ProcessedEvent

from .events import EVENT_TYPES
from .models import Customer, Order, Product
from .permissions import CanSubmitEvents
from .serializers import (
    AcceptedSerializer,
    CustomerSerializer,
    EventStatusSerializer,
    OrderSerializer,
    ProductSerializer,
)

MAX_BATCH = 500


class ApiRootView(APIView):
    """What the API serves: one absolute link per endpoint (the address ``make run`` prints)."""

    @extend_schema(
        responses={200: OpenApiTypes.OBJECT},
        description="The endpoints, by name, as absolute URLs; `{...}` marks a path parameter.",
    )
    def get(self, request: Request) -> Response:
        def link(name: str, **kwargs: str) -> str:
            # Templated links keep their braces readable instead of percent-encoded.
            return (
                reverse(name, kwargs=kwargs, request=request)
                .replace("%7B", "{")
                .replace("%7D", "}")
            )

        return Response(
            {
                "events": link("orders:events"),
                "eventStatus": link("orders:event-status", event_id="{eventId}"),
                "orders": link("orders:orders"),
                "orderRequest": link(
                    "orders:order-request", request_id="00000000-0000-0000-0000-000000000000"
                ).replace("00000000-0000-0000-0000-000000000000", "{requestId}"),
                "order": link("orders:order-detail", order_id="{orderId}"),
                "product": link("orders:product-detail", product_id="{productId}"),
                "customer": link("orders:customer-detail", customer_id="{customerId}"),
                "schema": link("schema"),
                "docs": link("api-docs"),
            }
        )


def validate_event(data: Any) -> tuple[dict[str, Any], Any]:
    """The normalised event and the task that consumes it; raises ``ValidationError``."""
    if not isinstance(data, dict):
        raise ValidationError({"non_field_errors": ["An event must be a JSON object."]})
    event_type = data.get("eventType")
    expected = ", ".join(EVENT_TYPES)
    if not isinstance(event_type, str):
        # Checked first: an object or a list cannot even be looked up (it is unhashable).
        message = f"The event type must be a string, one of {expected}."
        if "eventType" not in data:
            message = f"This field is required (one of {expected})."
        raise ValidationError({"eventType": [message]})
    if event_type not in EVENT_TYPES:
        raise ValidationError(
            {"eventType": [f"Unknown event type {event_type[:100]!r}; expected one of {expected}."]}
        )
    serializer = EVENT_TYPES[event_type].serializer(data=data)
    serializer.is_valid(raise_exception=True)
    return dict(serializer.data), EVENT_TYPES[event_type].task


def validate_batch(data: list[Any]) -> list[tuple[dict[str, Any], Any]]:
    """Every event of a batch, or a 400 listing each invalid one by index: all or nothing."""
    if not data:
        raise ValidationError({"non_field_errors": ["The batch is empty."]})
    if len(data) > MAX_BATCH:
        raise ValidationError(
            {"non_field_errors": [f"A batch holds at most {MAX_BATCH} events, not {len(data)}."]}
        )
    accepted, errors = [], {}
    for index, item in enumerate(data):
        try:
            accepted.append(validate_event(item))
        except ValidationError as exc:
            errors[str(index)] = exc.detail
    if errors:
        raise ValidationError({"events": errors})
    return accepted


EVENT_REQUEST = PolymorphicProxySerializer(
    component_name="Event",
    serializers={name: kind.serializer for name, kind in EVENT_TYPES.items()},
    resource_type_field_name="eventType",
)


class EventView(APIView):
    """Accept one event, or a list of up to 500; workers apply each once, after the commit."""

    permission_classes = [CanSubmitEvents]

    @extend_schema(
        request=EVENT_REQUEST,
        description="\n\n".join(
            [
                "Accepts one event object, or a JSON list of up to 500 (validated all or "
                "nothing). Each accepted event is stored in the outbox in the request's "
                "transaction and published to its Celery task after the commit (by the relay "
                "if the broker is away). Posting an event again is accepted again; its effect "
                "still happens once.",
                *(f"**{name}**: {kind.description}" for name, kind in EVENT_TYPES.items()),
            ]
        ),
        responses={
            202: AcceptedSerializer,
            400: OpenApiResponse(description="Invalid event(s): field errors"),
            401: OpenApiResponse(description="Not authenticated"),
            403: OpenApiResponse(description="Lacks the orders.submit_event permission"),
            413: OpenApiResponse(description="Request body over 1 MiB"),
        },
    )
    def post(self, request: Request) -> Response:
        # A body over 1 MiB never gets here: project.middleware answers 413 for every endpoint.
        data: Any = request.data
        batch = isinstance(data, list)
        events = validate_batch(data) if batch else [validate_event(data)]
        with transaction.atomic():
            # Stored with this transaction, published after it commits: not lost if the
            # broker is down or this process dies in between (the relay publishes it then).
            for event, task in events:
                outbox.enqueue(task, [event], event_id=event["eventId"])
        accepted = [{"eventId": event["eventId"], "status": "accepted"} for event, _ in events]
        return Response(accepted if batch else accepted[0], status=status.HTTP_202_ACCEPTED)


def consumer_status(record: ProcessedEvent) -> str:
    if record.has_mismatch:
        return "mismatch"
    if record.outcome == Outcome.REJECTED:
        return "rejected"
    if record.duplicate_count:
        return "duplicate-discarded"
    return "processed"


#: The overall status is the most telling of its consumers' statuses.
STATUS_PRECEDENCE = ["mismatch", "dead_lettered", "rejected", "duplicate-discarded", "processed"]


def dead_letter_reason(letter: DeadLetter) -> str:
    """Why the letter was stored, in words, with the exception's first line when there is one."""
    exception = letter.exception.strip().splitlines()[0] if letter.exception.strip() else ""
    reason = str(letter.get_reason_display())
    return f"{reason}: {exception}"[:500] if exception else reason


class EventStatusView(APIView):
    """Where an event stands with each of its consumers."""

    @extend_schema(
        responses={
            200: EventStatusSerializer,
            404: OpenApiResponse(
                description="No record of this event: never posted, or purged since."
            ),
        },
        description="`pending` while the event waits in the outbox or for a worker (or was "
        "re-driven); `dead_lettered` when a consumer gave up on it and the dead letter was "
        "not re-driven (the reason says why); otherwise the most telling of its consumers' "
        "statuses. Duplicates are counted only with IDEMPOTENCY['RECORD_DUPLICATES'] on (it "
        "is, in this project).",
    )
    def get(self, request: Request, event_id: str) -> Response:
        records = list(ProcessedEvent.objects.for_event(event_id).order_by("consumer"))
        consumers = [
            {
                "consumer": r.consumer,
                "status": consumer_status(r),
                "reason": r.reason,
                "processedAt": r.processed_at,
                "deadLetteredAt": None,
                "duplicatesDiscarded": r.duplicate_count,
            }
            for r in records
        ]
        letters = list(DeadLetter.objects.filter(event_id=event_id).order_by("-created_at", "-pk"))
        # A consumer with an inbox record has its outcome; one whose latest letter was not
        # re-driven gave up on the event. A re-driven letter leaves the event pending.
        decided = {r.consumer for r in records}
        for letter in letters:
            if letter.task_name in decided:
                continue
            decided.add(letter.task_name)
            if letter.redriven_at is None:
                consumers.append(
                    {
                        "consumer": letter.task_name,
                        "status": "dead_lettered",
                        "reason": dead_letter_reason(letter),
                        "processedAt": None,
                        "deadLetteredAt": letter.created_at,
                        "duplicatesDiscarded": 0,
                    }
                )
        if (
            not consumers
            and not letters
            and not OutboxMessage.objects.filter(event_id=event_id).exists()
        ):
            raise NotFound("No record of this event: never posted, or purged since.")
        consumers.sort(key=lambda c: str(c["consumer"]))
        statuses = {c["status"] for c in consumers}
        overall = next((s for s in STATUS_PRECEDENCE if s in statuses), "pending")
        body = {"eventId": event_id, "status": overall, "consumers": consumers}
        return Response(EventStatusSerializer(body).data)


#: What a detail endpoint answers for an id it does not know.
NOT_FOUND = OpenApiResponse(description="No such object.")


class OrderListView(generics.ListAPIView):
    serializer_class = OrderSerializer

    @extend_schema(
        parameters=[
            OpenApiParameter("customerId", OpenApiTypes.STR, description="Only this customer's")
        ],
        responses={
            200: OrderSerializer(many=True),
            404: OpenApiResponse(description="No such page (past the last, or not a number)."),
        },
    )
    def get(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return super().get(request, *args, **kwargs)

    def get_queryset(self) -> Any:
        orders = Order.objects.prefetch_related("items__product", "payments")
        customer_id = self.request.query_params.get("customerId")
        if customer_id:
            orders = orders.filter(requested_customer_id=customer_id)
        return orders.order_by("-created_at", "-pk")


@extend_schema_view(get=extend_schema(responses={200: OrderSerializer, 404: NOT_FOUND}))
class OrderDetailView(generics.RetrieveAPIView):
    queryset = Order.objects.prefetch_related("items__product", "payments")
    serializer_class = OrderSerializer
    lookup_field = "order_id"
    lookup_url_kwarg = "order_id"


@extend_schema_view(get=extend_schema(responses={200: ProductSerializer, 404: NOT_FOUND}))
class ProductDetailView(generics.RetrieveAPIView):
    queryset = Product.objects.all()
    serializer_class = ProductSerializer
    lookup_field = "product_id"
    lookup_url_kwarg = "product_id"


@extend_schema_view(get=extend_schema(responses={200: CustomerSerializer, 404: NOT_FOUND}))
class CustomerDetailView(generics.RetrieveAPIView):
    queryset = Customer.objects.all()
    serializer_class = CustomerSerializer
    lookup_field = "customer_id"
    lookup_url_kwarg = "customer_id"
