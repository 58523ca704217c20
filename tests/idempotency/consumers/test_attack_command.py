"""consume_events' new kombu options under attack: values the command lets through to kombu."""

from __future__ import annotations

import pytest
from django.core.management.base import CommandError

from tests.idempotency.consumers.test_command import KOMBU, MEMORY, consume
from tests.services import REDIS_URL, require_broker


@pytest.mark.xfail(strict=True, reason="--transport-option values reach kombu unchecked")
@pytest.mark.django_db
def test_a_visibility_timeout_that_is_not_a_number_is_a_command_error() -> None:
    # --visibility-timeout is checked (more than 0, at most 86400), the same transport option
    # spelt --transport-option visibility_timeout=... is not: text ends the consumer with a
    # TypeError traceback from kombu's restore loop on the first idle poll; NaN (valid JSON for
    # json.loads) makes Redis answer "min or max is not a float", which the consumer reports
    # as "broker connection lost" and retries forever; -5 redelivers every message in flight.
    require_broker(REDIS_URL)
    with pytest.raises(CommandError, match="visibility"):
        consume(
            *KOMBU,
            "--url",
            REDIS_URL,
            "--queue",
            "attack-visibility",
            "--transport-option",
            "visibility_timeout=soon",
            "--idle-timeout",
            "3",
        )


@pytest.mark.xfail(strict=True, reason="an unknown alias is reported as a bad --url")
@pytest.mark.parametrize("transport", ["nosuch", ":"])
def test_an_unknown_transport_is_reported_against_transport_not_url(transport: str) -> None:
    # A --transport path that imports nothing names --transport; an alias kombu does not know,
    # or an empty path, is reported as "--url 'memory://': No such transport: nosuch".
    with pytest.raises(CommandError, match="--transport"):
        consume(*MEMORY, "--transport", transport)
