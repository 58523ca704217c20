from __future__ import annotations

from datetime import timedelta

import pytest
from django.test import override_settings

from idempotency.conf import DEFAULTS, app_settings
from idempotency.exceptions import IdempotencyConfigurationError


def test_defaults_apply() -> None:
    with override_settings(IDEMPOTENCY={}):
        assert DEFAULTS["RETENTION"] == app_settings.RETENTION
        assert app_settings.KEY == "eventId"


def test_override_settings_is_seen_and_undone() -> None:
    with override_settings(IDEMPOTENCY={"RETENTION": timedelta(hours=1)}):
        assert timedelta(hours=1) == app_settings.RETENTION
    assert timedelta(days=30) == app_settings.RETENTION


def test_unknown_keys_are_an_error() -> None:
    with (
        override_settings(IDEMPOTENCY={"RETENTON": timedelta(days=1)}),
        pytest.raises(IdempotencyConfigurationError, match="RETENTON"),
    ):
        app_settings.RETENTION  # noqa: B018


def test_not_a_dict_is_an_error() -> None:
    with (
        override_settings(IDEMPOTENCY=[("RETENTION", 1)]),
        pytest.raises(IdempotencyConfigurationError, match="must be a dict"),
    ):
        app_settings.RETENTION  # noqa: B018


def test_per_consumer_retention() -> None:
    overrides = {"slow": timedelta(days=90), "forever": None}
    with override_settings(IDEMPOTENCY={"CONSUMER_RETENTION": overrides}):
        assert app_settings.retention_for("slow") == timedelta(days=90)
        assert app_settings.retention_for("forever") is None
        assert app_settings.retention_for("other") == timedelta(days=30)


def test_unknown_attribute() -> None:
    with pytest.raises(AttributeError):
        app_settings.NOPE  # noqa: B018
