"""JetStreamConsumer on a real nats-server (JetStream): acked after the commit, never before."""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import Iterator
from typing import Any
from unittest import mock

import pytest
from django.db import OperationalError

from idempotency import deadletters
from idempotency.consumers import EventConsumer, Outcome
from tests.idempotency.consumers import handlers
from tests.services import require_broker, require_postgres

nats = pytest.importorskip("nats")

from idempotency.consumers.nats import JetStreamConsumer  # noqa: E402  (needs nats-py)
from idempotency.models import DeadLetter  # noqa: E402

pytestmark = [pytest.mark.services, pytest.mark.django_db(transaction=True)]

NATS_URL = os.environ.get("TEST_NATS_URL", "nats://127.0.0.1:4222")
CONSUMER = "tests.consumers.nats"


class Stream:
    """A stream, subject and durable of the test's own, deleted afterwards."""

    def __init__(self) -> None:
        token = uuid.uuid4().hex
        self.name = f"idem_consumers_{token}"
        self.subject = f"idem_consumers.{token}"
        self.durable = f"idem_consumers_{token}"

    async def _js(self) -> Any:
        connection = await nats.connect(NATS_URL)
        return connection, connection.jetstream()

    def create(self) -> None:
        async def go() -> None:
            connection, js = await self._js()
            await js.add_stream(name=self.name, subjects=[self.subject])
            await connection.close()

        asyncio.run(go())

    def delete(self) -> None:
        async def go() -> None:
            connection, js = await self._js()
            await js.delete_stream(self.name)
            await connection.close()

        asyncio.run(go())

    def publish(self, *bodies: Any, raw: bytes | None = None) -> None:
        async def go() -> None:
            connection, js = await self._js()
            for body in bodies:
                await js.publish(self.subject, json.dumps(body).encode())
            if raw is not None:
                await js.publish(self.subject, raw)
            await connection.close()

        asyncio.run(go())

    def pending(self) -> int:
        """Messages of the durable not yet acknowledged (delivered or not)."""

        async def go() -> int:
            connection, js = await self._js()
            info = await js.consumer_info(self.name, self.durable)
            await connection.close()
            return int(info.num_pending + info.num_ack_pending)

        return asyncio.run(go())


@pytest.fixture
def stream() -> Iterator[Stream]:
    require_postgres()
    require_broker(NATS_URL)
    made = Stream()
    made.create()
    yield made
    made.delete()


def consumer_for(stream: Stream, handler: Any = handlers.credit, **options: Any) -> Any:
    outcomes: list[Outcome] = []
    events = EventConsumer(handler, consumer=CONSUMER)
    adapter = JetStreamConsumer(
        events,
        servers=NATS_URL,
        stream=stream.name,
        subject=stream.subject,
        durable=stream.durable,
        on_outcome=outcomes.append,
        fetch_timeout=0.5,
        **options,
    )
    return adapter, outcomes


def test_each_event_is_applied_once_and_every_message_acknowledged(stream: Stream) -> None:
    handlers.ensure_customer()
    first, second = ({"eventId": str(uuid.uuid4())} for _ in range(2))
    stream.publish(first, second, first)
    adapter, outcomes = consumer_for(stream)
    assert adapter.run_sync(idle_timeout=1.5) == 3
    assert sorted(o.status for o in outcomes) == ["duplicate", "processed", "processed"]
    assert handlers.effects(first["eventId"]) == 1
    assert handlers.effects(second["eventId"]) == 1
    assert stream.pending() == 0


def test_a_poison_and_an_undecodable_message_are_dead_lettered_and_acknowledged(
    stream: Stream,
) -> None:
    handlers.ensure_customer()
    body = {"eventId": str(uuid.uuid4())}
    stream.publish(body, raw=b"\xff not json")
    adapter, outcomes = consumer_for(stream, handlers.poison)
    adapter.run_sync(idle_timeout=1.5)
    assert [o.status for o in outcomes] == ["dead-lettered", "dead-lettered"]
    reasons = sorted(DeadLetter.objects.values_list("reason", flat=True))
    assert reasons == sorted([deadletters.FAILED, deadletters.UNDECODABLE])
    assert DeadLetter.objects.get(reason=deadletters.FAILED).task_id == f"{stream.name}:1"
    assert handlers.effects(body["eventId"]) == 0
    assert stream.pending() == 0


def test_a_message_with_no_durable_outcome_is_redelivered_and_counted(stream: Stream) -> None:
    handlers.ensure_customer()
    body = {"eventId": str(uuid.uuid4())}
    stream.publish(body)
    adapter, outcomes = consumer_for(stream, handlers.poison)
    with mock.patch("idempotency.deadletters.store._store", side_effect=OperationalError("down")):
        assert adapter.run_sync(limit=1) == 1
    assert [o.status for o in outcomes] == ["not-stored"]
    assert stream.pending() == 1
    # The nak'd message comes straight back, flagged as a redelivery (delivery count 2).
    adapter, outcomes = consumer_for(stream, handlers.poison)
    adapter.run_sync(idle_timeout=1.5)
    assert [o.status for o in outcomes] == ["dead-lettered"]
    assert DeadLetter.objects.get().event_id == body["eventId"]
    assert stream.pending() == 0


@pytest.mark.parametrize(
    "options",
    [{"stream": ""}, {"subject": ""}, {"durable": ""}, {"ack_wait": 0}, {"ack_wait": 10**30}],
    ids=repr,
)
def test_a_misconfigured_adapter_is_refused(options: dict[str, Any]) -> None:
    arguments = {"stream": "s", "subject": "x", "durable": "d", **options}
    with pytest.raises(ValueError, match=r"stream|subject|durable|ack_wait"):
        JetStreamConsumer(
            EventConsumer(handlers.credit, consumer=CONSUMER), servers=NATS_URL, **arguments
        )
