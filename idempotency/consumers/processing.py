"""What becomes of one message read by a consumer's own loop: the broker-neutral core.

:class:`EventConsumer` runs a handler for a decoded event inside :class:`~idempotency.inbox.
idempotent` and returns a :class:`Decision`: the adapter acknowledges the message (``ACK``) only
once the decision says its outcome is durable, and gives it back to the broker (``REQUEUE``: a
negative acknowledgement, a requeue, or no ack at all) otherwise. The rule is the Celery
integration's:

- applied and committed, or a duplicate the inbox discarded: ``ACK``;
- an event that can never succeed (no usable key, too large, a handler's final failure, too
  many deliveries): a dead letter is stored first, then ``ACK``; if even the dead letter cannot
  be stored, ``REQUEUE``;
- a transient infrastructure error (the database unreachable, a serialization failure): waited
  out in-process for ``TRANSIENT_RETRY_WINDOW``, then ``REQUEUE``; it never dead-letters and
  never spends the delivery limit;
- an error listed in ``retry_for``: ``REQUEUE``, so the broker redelivers it; each redelivery
  counts towards ``DELIVERY_LIMIT``, after which it is dead-lettered;
- ``KeyboardInterrupt``/``SystemExit`` propagate with nothing decided: the message stays
  unacknowledged and the broker redelivers it when the connection closes.
"""

from __future__ import annotations

import enum
import json
import logging
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from django.core.serializers.json import DjangoJSONEncoder
from django.db.models import F

from .. import deadletters
from ..conf import app_settings
from ..exceptions import (
    AfterCommitError,
    IdempotencyConfigurationError,
    InvalidConsumerName,
    InvalidEvent,
    InvalidEventId,
)
from ..inbox import idempotent, inbox_database
from ..keys import KeySpec, consumer_name, extract_key
from ..transient import TRANSIENT_ERRORS, TransientWait, drop_connections, is_transient

logger = logging.getLogger("idempotency")


class Decision(enum.Enum):
    """What the adapter does with the message."""

    #: The outcome is durable (effect and inbox record, or a dead letter): acknowledge.
    ACK = "ack"
    #: Nothing durable: give the message back (nack with requeue, or leave it unacknowledged).
    REQUEUE = "requeue"


@dataclass(frozen=True)
class Outcome:
    """The decision on one message, and why (for the log and the tests)."""

    decision: Decision
    #: ``processed``, ``duplicate``, ``applied-callback-failed``, ``dead-lettered``,
    #: ``transient``, ``retry`` or ``not-stored`` (a dead letter that could not be stored).
    status: str
    event_id: str = ""
    result: Any = None
    dead_letter: Any = None
    error: BaseException | None = field(default=None, compare=False)

    @property
    def ack(self) -> bool:
        return self.decision is Decision.ACK


@dataclass(frozen=True)
class Delivery:
    """One message as a broker delivered it, in the terms the core needs.

    *message_id* must stay the same across redeliveries of the message (an AMQP ``message_id``,
    a JetStream stream sequence, a Kafka ``topic:partition:offset``): the delivery limit counts
    deliveries under it. *redelivered* is the broker's flag (or ``delivery count > 1``); a first
    delivery is never counted, so the hot path writes nothing extra.
    """

    body: Any
    message_id: str = ""
    redelivered: bool = False
    headers: dict[str, Any] | None = None
    #: The raw body, kept in a dead letter when the event cannot be decoded.
    raw: str = ""


class EventConsumer:
    """Process decoded events with *handler*, at most once per (consumer, event id)::

        consumer = EventConsumer(apply_payment, consumer="billing.payments", key="eventId")
        outcome = consumer.process(Delivery(body=event, message_id=..., redelivered=...))
        message.ack() if outcome.ack else message.requeue()

    *handler* takes the event and returns a JSON-serialisable result (stored with the inbox
    record, see ``STORE_RESULTS``); it runs inside the claim's transaction, so its writes commit
    with the record. *key* is a key spec (:mod:`idempotency.keys`); default ``KEY``.
    *retry_for* lists the errors that give the message back to the broker for a redelivery
    instead of dead-lettering it at once. *transient_window* (seconds) overrides
    ``TRANSIENT_RETRY_WINDOW``: keep it well inside the broker's ack deadline (a JetStream
    ``ack_wait``, an SQS visibility timeout), or the broker redelivers the message meanwhile.
    """

    def __init__(
        self,
        handler: Callable[[Any], Any],
        *,
        consumer: str,
        key: KeySpec | None = None,
        retry_for: tuple[type[BaseException], ...] = (),
        fingerprint: bool = True,
        transient_window: float | None = None,
        using: str | None = None,
    ) -> None:
        if not callable(handler):
            raise IdempotencyConfigurationError(f"the handler must be callable, not {handler!r}")
        consumer_name(consumer)  # checked here, at start-up, rather than on the first event
        if not consumer.strip():
            raise InvalidConsumerName("a consumer name is required")
        if transient_window is not None and not (0 <= transient_window <= 86_400):
            raise IdempotencyConfigurationError(
                "transient_window must be a number of seconds from 0 to 86400"
            )
        self.handler = handler
        self.consumer = consumer
        self.key = key
        self.retry_for = tuple(retry_for)
        self.fingerprint = fingerprint
        self.transient_window = transient_window
        self.using = using

    # --- the one entry point ------------------------------------------------------------------

    def process(self, delivery: Delivery) -> Outcome:
        """Decide the fate of *delivery*; see the module for the rule."""
        event = delivery.body
        try:
            event_id = extract_key(event, self.key if self.key is not None else app_settings.KEY)
        except InvalidEventId as exc:
            return self._dead_letter(deadletters.INVALID_KEY, exc, delivery, "")
        wait: TransientWait | None = None
        counted = False
        while True:
            try:
                if not counted:
                    # Once per delivery, however many attempts a transient wait makes.
                    over = self._over_delivery_limit(delivery, event_id)
                    if over is not None:
                        return over
                    counted = True
                return self._apply(event, event_id)
            except AfterCommitError as exc:
                # Applied and committed: acknowledge. Dead-lettering an event whose effect
                # exists would let a re-drive after a purge apply it twice.
                logger.error(
                    "%s applied event %s, then an on_commit callback raised: %r",
                    self.consumer,
                    event_id,
                    exc.__cause__,
                    exc_info=exc,
                    extra={"consumer": self.consumer, "event_id": event_id},
                )
                return Outcome(Decision.ACK, "applied-callback-failed", event_id, error=exc)
            except InvalidEvent as exc:
                return self._dead_letter(deadletters.INVALID_EVENT, exc, delivery, event_id)
            except Exception as exc:
                if not (isinstance(exc, TRANSIENT_ERRORS) and is_transient(exc)):
                    if isinstance(exc, self.retry_for):
                        logger.warning(
                            "%s event %s failed (%r): the message goes back for a redelivery",
                            self.consumer,
                            event_id,
                            exc,
                            extra={"consumer": self.consumer, "event_id": event_id},
                        )
                        return Outcome(Decision.REQUEUE, "retry", event_id, error=exc)
                    return self._dead_letter(deadletters.FAILED, exc, delivery, event_id)
                if wait is None:
                    wait = TransientWait(self._window())
                drop_connections()
                if not wait.pause():
                    logger.warning(
                        "%s event %s: the database is still unavailable (%r): the message goes "
                        "back to the broker",
                        self.consumer,
                        event_id,
                        exc,
                        extra={"consumer": self.consumer, "event_id": event_id},
                    )
                    self._take_back_count(delivery, event_id, counted)
                    return Outcome(Decision.REQUEUE, "transient", event_id, error=exc)
                logger.log(
                    logging.WARNING if wait.pauses == 1 else logging.INFO,
                    "%s event %s: transient database error, attempt %d again: %r",
                    self.consumer,
                    event_id,
                    wait.pauses + 1,
                    exc,
                )

    def undecodable(self, delivery: Delivery, exc: BaseException) -> Outcome:
        """A message whose body could not be decoded: a dead letter (reason ``undecodable``)."""
        return self._dead_letter(deadletters.UNDECODABLE, exc, delivery, "")

    # --- the steps ----------------------------------------------------------------------------

    def _apply(self, event: Any, event_id: str) -> Outcome:
        options: dict[str, Any] = {"using": self.using}
        if self.fingerprint:
            options["payload"] = event
        with idempotent(self.consumer, event_id, **options) as claim:
            if claim.duplicate:
                return Outcome(Decision.ACK, "duplicate", event_id, result=claim.result)
            claim.result = self.handler(event)
            result = claim.result
        return Outcome(Decision.ACK, "processed", event_id, result=result)

    def _window(self) -> float:
        if self.transient_window is not None:
            return self.transient_window
        return float(app_settings.TRANSIENT_RETRY_WINDOW.total_seconds())

    def _over_delivery_limit(self, delivery: Delivery, event_id: str) -> Outcome | None:
        """Count a redelivery; an outcome when it is past ``DELIVERY_LIMIT``, else None."""
        limit = app_settings.DELIVERY_LIMIT
        if limit is None or not delivery.redelivered:
            return None  # a first delivery: the hot path writes nothing
        from ..models import DeliveryAttempt, ProcessedEvent

        deliveries = DeliveryAttempt.objects.count_delivery(
            self._counter_id(delivery, event_id), task_name=self.consumer, event_id=event_id
        )
        if deliveries <= limit:
            return None
        using = self.using or inbox_database()
        records = ProcessedEvent.objects.using(using).for_consumer(self.consumer)
        if records.for_event(event_id).exists():
            return Outcome(Decision.ACK, "duplicate", event_id)
        exc = RuntimeError(
            f"delivered {deliveries} times (DELIVERY_LIMIT is {limit}): each delivery ended "
            "without an outcome (the consumer was killed or lost)"
        )
        return self._dead_letter(
            deadletters.DELIVERY_LIMIT, exc, delivery, event_id, attempts=deliveries
        )

    def _counter_id(self, delivery: Delivery, event_id: str) -> str:
        # Two consumers reading the same stream count their deliveries apart; a message with
        # no id of its own is counted under its event id.
        return f"{self.consumer}:{delivery.message_id or event_id}"[:255]

    def _take_back_count(self, delivery: Delivery, event_id: str, counted: bool) -> None:
        """An outage given back is no death of the consumer: its delivery is not counted."""
        if not (counted and delivery.redelivered):
            return
        if app_settings.DELIVERY_LIMIT is None:
            return
        from ..models import DeliveryAttempt

        try:
            DeliveryAttempt.objects.filter(
                task_id=self._counter_id(delivery, event_id), deliveries__gt=1
            ).update(deliveries=F("deliveries") - 1)
        except Exception:  # the database may be the very thing that is down: the count stays
            logger.debug("could not take back a delivery count", exc_info=True)

    def _dead_letter(
        self,
        reason: str,
        exc: BaseException,
        delivery: Delivery,
        event_id: str,
        *,
        attempts: int = 1,
    ) -> Outcome:
        logger.error(
            "%s refused a message (%s): %s",
            self.consumer,
            reason,
            exc,
            extra={"consumer": self.consumer, "event_id": event_id},
        )
        letter = deadletters.record(
            reason=reason,
            task_name=self.consumer,
            task_id=delivery.message_id,
            event_id=event_id,
            # No task arguments: a consumer's letter is not a Celery task that `dead_letters
            # --redrive` could send; its raw body is kept to be published to its queue again.
            body=delivery.raw or _text_of(delivery.body),
            headers=delivery.headers,
            exception=exc,
            traceback=_format(exc),
            attempts=attempts,
        )
        if letter is None:
            # Nothing kept: the message must stay with the broker.
            return Outcome(Decision.REQUEUE, "not-stored", event_id, error=exc)
        return Outcome(Decision.ACK, "dead-lettered", event_id, dead_letter=letter, error=exc)


def _text_of(body: Any) -> str:
    try:
        return json.dumps(body, cls=DjangoJSONEncoder, ensure_ascii=False)
    except Exception:
        return ""  # the store keeps what it can; the exception names the failure


def _format(exc: BaseException) -> str:
    try:
        return "".join(traceback.format_exception(exc))
    except Exception:
        return ""
