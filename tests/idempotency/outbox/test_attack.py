"""The outbox attacked from outside: stalls, bad input, bounds, permissions, concurrency."""

from __future__ import annotations

import datetime
import decimal
from io import StringIO
from typing import Any
from unittest import mock

import pytest
from django.core.management import CommandError, call_command
from django.db import DatabaseError, connection, transaction

from idempotency import outbox
from idempotency.exceptions import InvalidEvent
from idempotency.models import OutboxMessage
from tests.celery_app import mocked_celery_app

pytestmark = pytest.mark.django_db


@pytest.fixture
def broker() -> Any:
    """``send_task`` of a mocked Celery app that encodes like the real one (kombu's json)."""
    from kombu.serialization import dumps
    from kombu.transport.pyamqp import Transport

    with mocked_celery_app() as app:
        app.connection_for_write.return_value.connection_errors = Transport.connection_errors
        app.connection_for_write.return_value.channel_errors = Transport.channel_errors

        def send(name: str, *, args: Any, kwargs: Any, **options: Any) -> None:
            dumps((args, kwargs, {}), serializer="json")

        app.send_task.side_effect = send
        yield app.send_task


def odd_options(*bad: str) -> Any:
    """A publish that fails with an error outside the known refusals for the rows *bad*."""

    def send(name: str, *, args: Any, **options: Any) -> None:
        if args and args[0] in bad:
            raise TypeError("unsupported operand type(s) for +: 'datetime' and 'str'")

    return send


# --- A run of unexpected errors longer than a batch ------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_unexpected_errors_filling_a_whole_batch_do_not_stall_the_outbox(
    broker: mock.Mock, batch_size: int
) -> None:
    for name in ("bad-1", "bad-2", "bad-3", "good-1", "good-2"):
        outbox.enqueue("t.name", [name], publish_on_commit=False)
    broker.side_effect = odd_options("bad-1", "bad-2", "bad-3")
    for _ in range(3):  # several runs: the same oldest rows must not hold the rest back
        outbox.relay_messages(batch_size=batch_size)
    published = OutboxMessage.objects.filter(published_at__isnull=False)
    assert sorted(m.args[0] for m in published) == ["good-1", "good-2"]
    # Rows after them went through: the bad ones are at fault and set aside.
    assert sorted(m.args[0] for m in OutboxMessage.objects.failed()) == ["bad-1", "bad-2", "bad-3"]


def test_the_command_with_batch_size_one_goes_past_an_unexpected_error(broker: mock.Mock) -> None:
    for name in ("bad", "good"):
        outbox.enqueue("t.name", [name], publish_on_commit=False)
    broker.side_effect = odd_options("bad")
    out = StringIO()
    call_command("relay_outbox", "--batch-size", "1", stdout=out)
    assert OutboxMessage.objects.get(args=["good"]).published_at is not None
    assert OutboxMessage.objects.failed().get().args == ["bad"]


def test_only_unexpected_errors_still_hold_every_row(broker: mock.Mock) -> None:
    # The process, not the rows, may be at fault: nothing goes through, nothing is set aside.
    for n in range(5):
        outbox.enqueue("t.name", [n], publish_on_commit=False)
    broker.side_effect = RuntimeError("Acquire on closed pool")
    result = outbox.relay_messages(batch_size=2)
    assert (result.published, result.failed, result.held) == (0, 0, 5)
    assert OutboxMessage.objects.pending().count() == 5
    assert set(OutboxMessage.objects.values_list("attempts", flat=True)) == {1}


# --- The command's bounds ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["--batch-size", "0"],
        ["--batch-size", "-5"],
        ["--batch-size", str(10**20)],
        ["--batch-size", str(2**63)],
        ["--interval", "0"],
        ["--interval", "-1"],
        ["--interval", "nan"],
        ["--interval", "inf"],
        ["--interval", str(10**400)],
    ],
)
def test_the_command_refuses_bad_bounds(broker: mock.Mock, argv: list[str]) -> None:
    outbox.enqueue("t.name", [1], publish_on_commit=False)
    with pytest.raises(CommandError):
        call_command("relay_outbox", "--forever", *argv, stdout=StringIO())
    assert OutboxMessage.objects.pending().count() == 1


def test_a_large_batch_size_still_works(broker: mock.Mock) -> None:
    for n in range(3):
        outbox.enqueue("t.name", [n], publish_on_commit=False)
    call_command("relay_outbox", "--batch-size", "10000", stdout=StringIO())
    assert not OutboxMessage.objects.pending().exists()


# --- What enqueue takes ----------------------------------------------------------------------


def deep(levels: int) -> Any:
    value: Any = 0
    for _ in range(levels):
        value = [value]
    return value


@pytest.mark.parametrize(
    "args",
    [
        pytest.param([decimal.Decimal("1.10")], id="decimal"),
        pytest.param([datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)], id="datetime"),
        pytest.param([b"bytes"], id="bytes"),
        pytest.param([{1, 2}], id="set"),
        pytest.param([object()], id="object"),
        pytest.param([deep(100_000)], id="deep-100000"),
        pytest.param([float("nan")], id="nan"),
        pytest.param(["nul\x00inside"], id="nul"),
        pytest.param([{"k": "\ud800"}], id="lone-surrogate"),
    ],
)
@pytest.mark.django_db(transaction=True)
def test_args_the_outbox_cannot_carry_fail_before_the_commit_or_are_set_aside(
    broker: mock.Mock, args: list[Any]
) -> None:
    """Either enqueue refuses them at once with a clear error (before anything commits), or
    the row is published or set aside: never a relay stuck on it."""
    refused: BaseException | None = None
    try:
        with transaction.atomic():
            outbox.enqueue("t.name", args, publish_on_commit=False)
    except (TypeError, ValueError) as exc:
        refused = exc
    if refused is not None:
        assert not OutboxMessage.objects.exists()
    outbox.enqueue("t.name", ["good"], publish_on_commit=False)
    result = outbox.relay_messages()
    assert result.outage is None
    good = OutboxMessage.objects.get(args=["good"])
    assert good.published_at is not None
    assert not OutboxMessage.objects.pending().exists()


@pytest.mark.parametrize(
    "args", [[10**30], [deep(200)], [{"a": [1.5, None, True, "é\u2028"]}], [-(2**70)]]
)
@pytest.mark.django_db(transaction=True)
def test_args_json_can_carry_are_published_as_given(broker: mock.Mock, args: list[Any]) -> None:
    if connection.vendor == "mysql" and args == [deep(200)]:
        # MariaDB's JSON_VALID check (Django's JSONField there) refuses nesting past 32 levels:
        # the caller's transaction gets the database's error and nothing is stored.
        with pytest.raises(DatabaseError), transaction.atomic():
            outbox.enqueue("t.name", args, publish_on_commit=False)
        assert not OutboxMessage.objects.exists()
        return
    with transaction.atomic():
        message = outbox.enqueue("t.name", args, publish_on_commit=False)
    assert outbox.relay() == 1
    assert broker.call_args.kwargs["args"] == args
    message.refresh_from_db()
    assert message.published_at is not None


@pytest.mark.parametrize("args", ["abc", b"abc"])
def test_a_string_is_not_a_list_of_arguments(args: Any) -> None:
    with pytest.raises(TypeError, match="list or tuple"):
        outbox.enqueue("t.name", args, publish_on_commit=False)
    assert not OutboxMessage.objects.exists()


@pytest.mark.parametrize("text", ["\\u0000", "C:\\u0000\\dir", "\\\\u0000"])
def test_a_literal_backslash_u0000_is_text_not_a_nul(text: str) -> None:
    message = outbox.enqueue("t.name", [text], publish_on_commit=False)
    message.refresh_from_db()
    assert message.args == [text]


@pytest.mark.parametrize("text", ["\x00", "\\\x00", "a\\\\\x00"])
def test_a_nul_after_backslashes_is_still_refused(text: str) -> None:
    with pytest.raises(InvalidEvent, match="NUL"):
        outbox.enqueue("t.name", [text], publish_on_commit=False)
