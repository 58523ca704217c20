"""drf-spectacular helpers describing an :func:`idempotency.http.idempotent_request` view.

::

    @extend_schema(
        parameters=[idempotency_key_parameter(), *idempotency_response_headers(201)],
        responses={201: PaymentSerializer, **problem_responses(400, 409, 422)},
    )
    @idempotent_request(required=True)
    def post(self, request): ...
"""

from __future__ import annotations

# The openapi extra: without it, say which to install rather than fail on a bare import.
try:
    import drf_spectacular  # noqa: F401
    import rest_framework  # noqa: F401
except ImportError as _exc:
    from .extras import missing

    raise missing("openapi", "idempotency.openapi") from _exc

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse
from rest_framework import serializers

from .http import HEADER, MAX_KEY_LENGTH, PROBLEM_CONTENT_TYPE, REPLAYED_HEADER

#: What each status code means for a keyed request.
PROBLEM_DESCRIPTIONS = {
    400: f"The {HEADER} header is missing (this endpoint requires it) or malformed.",
    409: f"A request with this {HEADER} is still being processed; retry after Retry-After.",
    422: f"This {HEADER} was already used for a different request.",
    503: "The database is unavailable; retry the same request (same key) after Retry-After. "
    "The key was released, or is taken over by that retry.",
}


class ProblemSerializer(serializers.Serializer):
    """An RFC 9457 problem document."""

    type = serializers.CharField(help_text="A URI naming the problem.")
    title = serializers.CharField()
    status = serializers.IntegerField()
    detail = serializers.CharField()


#: What :func:`idempotency.http.parse_key` accepts, as an OpenAPI pattern: 1 to
#: ``MAX_KEY_LENGTH`` visible ASCII characters, but not ``""`` (an empty quoted key).
KEY_PATTERN = rf'^(?!""$)[!-~]{{1,{MAX_KEY_LENGTH}}}$'


def idempotency_key_parameter(*, required: bool = True) -> OpenApiParameter:
    return OpenApiParameter(
        HEADER,
        {
            "type": "string",
            "minLength": 1,
            "maxLength": MAX_KEY_LENGTH,
            "pattern": KEY_PATTERN,
            "example": "6b114c3b-0e01-4b72-8f20-3c8529c75830",
        },
        OpenApiParameter.HEADER,
        required=required,
        description=(
            "A unique value per operation, at most "
            f"{MAX_KEY_LENGTH} visible ASCII characters (a UUID, say). A retry with the same "
            "key and request gets the first response again instead of repeating the operation."
        ),
    )


def idempotency_response_headers(*statuses: int) -> list[OpenApiParameter]:
    """The headers a keyed endpoint adds to its responses of *statuses* and to a 409."""
    return [
        OpenApiParameter(
            REPLAYED_HEADER,
            OpenApiTypes.STR,
            OpenApiParameter.HEADER,
            enum=["true"],
            description="Present on a replay of the response stored for this key.",
            response=list(statuses),
        ),
        OpenApiParameter(
            "Retry-After",
            OpenApiTypes.INT,
            OpenApiParameter.HEADER,
            description="Seconds to wait before retrying the request.",
            response=[409, 503],
        ),
    ]


def problem_responses(*statuses: int) -> dict[tuple[int, str], OpenApiResponse]:
    """The ``application/problem+json`` responses of *statuses* (400, 409, 422, 503)."""
    return {
        (status, PROBLEM_CONTENT_TYPE): OpenApiResponse(
            ProblemSerializer, description=PROBLEM_DESCRIPTIONS.get(status, "")
        )
        for status in statuses
    }
