"""The one primitive: claim (consumer, event id) in the same transaction as the effect.

Everything else in the app (the Celery decorator, the handler decorator) is a thin layer over
:class:`idempotent`.
"""

from __future__ import annotations

import logging
import sys
from contextvars import ContextVar
from types import TracebackType
from typing import Any

from django.db import DEFAULT_DB_ALIAS, connections, router, transaction
from django.db.models import F
from django.utils import timezone

from . import signals
from .conf import MISMATCH_POLICIES, app_settings
from .exceptions import IdempotencyConfigurationError, PayloadMismatch, TransactionRequired
from .fingerprint import fingerprint as compute_fingerprint
from .models import Outcome, ProcessedEvent
from .statements import claim_statement

logger = logging.getLogger("idempotency")

_NO_PAYLOAD = object()

#: The innermost active claim, so code deep inside a handler can reject the event.
_active: ContextVar[idempotent | None] = ContextVar("idempotency_active_claim", default=None)


def inbox_database() -> str:
    """The database alias that holds the inbox, as the project's routers decide."""
    return router.db_for_write(ProcessedEvent) or DEFAULT_DB_ALIAS


def claim(
    consumer: str,
    event_id: str,
    *,
    fingerprint: str = "",
    payload: Any = None,
    using: str | None = None,
) -> tuple[ProcessedEvent, bool]:
    """Claim *event_id* for *consumer*: ``(record, created)`` with ``get_or_create`` semantics.

    Must run inside ``transaction.atomic()`` on the inbox database, next to the business
    change, so the two commit or roll back together. A concurrent claim of the same key blocks
    until this transaction ends, then sees ``created=False`` (or ``True`` if this one rolled back).
    """
    using = using or inbox_database()
    if not connections[using].in_atomic_block:
        raise TransactionRequired(
            f"claim({consumer!r}, {event_id!r}) must run inside transaction.atomic(using={using!r})"
        )
    if not consumer:
        raise IdempotencyConfigurationError("a consumer name is required")
    defaults = {"fingerprint": fingerprint, "payload": payload}
    return claim_statement(using)(using, consumer, event_id, defaults)


class idempotent:  # noqa: N801 (used as a context manager, like transaction.atomic)
    """Run a block at most once per (consumer, event id)::

        with idempotent("billing.debit", event["eventId"], payload=event) as claim:
            if claim.duplicate:
                return claim.result
            account.debit(...)
            claim.result = {"balance": "90.00"}

    It opens ``transaction.atomic()`` (a savepoint when nested, unless ``savepoint=False``),
    claims the key, and commits the record with the block's writes. If the block raises, the
    record is rolled back with everything else, so a retry processes the event again.

    A duplicate whose payload fingerprint differs from the stored one raises
    :class:`PayloadMismatch` from ``__enter__`` (the block does not run) or, with
    ``on_mismatch="discard"``, is discarded like any duplicate. Either way the mismatch is
    logged, signalled and recorded on the original row (unless an enclosing transaction of the
    caller's rolls back).
    """

    def __init__(
        self,
        consumer: str,
        event_id: str,
        *,
        payload: Any = _NO_PAYLOAD,
        on_mismatch: str | None = None,
        store_result: bool | None = None,
        store_payload: bool | None = None,
        using: str | None = None,
        savepoint: bool = True,
    ) -> None:
        self.consumer = consumer
        self.event_id = str(event_id)
        self.fingerprint = "" if payload is _NO_PAYLOAD else compute_fingerprint(payload)
        if store_payload is None:
            store_payload = app_settings.STORE_PAYLOADS
        self.payload = payload if store_payload and payload is not _NO_PAYLOAD else None
        self.on_mismatch = on_mismatch or app_settings.ON_MISMATCH
        if self.on_mismatch not in MISMATCH_POLICIES:
            raise IdempotencyConfigurationError(
                f"on_mismatch must be one of {', '.join(MISMATCH_POLICIES)}, "
                f"not {self.on_mismatch!r}"
            )
        self.store_result = app_settings.STORE_RESULTS if store_result is None else store_result
        self.using = using or inbox_database()
        self._atomic = transaction.atomic(using=self.using, savepoint=savepoint)
        self.record: ProcessedEvent | None = None
        self.created = False
        self.result: Any = None
        self._outcome = Outcome.PROCESSED
        self._reason = ""
        self._token: Any = None

    @property
    def duplicate(self) -> bool:
        """True when the event was already processed: skip the business logic."""
        return not self.created

    def reject(self, reason: str) -> None:
        """Record the event as processed with a final negative outcome (no retry)."""
        self._outcome = Outcome.REJECTED
        self._reason = reason

    def _log_extra(self) -> dict[str, str]:
        return {"consumer": self.consumer, "event_id": self.event_id}

    def __enter__(self) -> idempotent:
        self._atomic.__enter__()
        try:
            self.record, self.created = claim(
                self.consumer,
                self.event_id,
                fingerprint=self.fingerprint,
                payload=self.payload,
                using=self.using,
            )
        except BaseException:
            self._atomic.__exit__(*sys.exc_info())
            raise
        if self.created:
            self._token = _active.set(self)
            return self
        record = self.record
        self.result = record.result
        if self.fingerprint and record.fingerprint and self.fingerprint != record.fingerprint:
            mismatch = PayloadMismatch(
                self.consumer, self.event_id, record.fingerprint, self.fingerprint
            )
            logger.warning(
                "payload mismatch for %s event %s: stored %s, received %s",
                self.consumer,
                self.event_id,
                record.fingerprint,
                self.fingerprint,
                extra={
                    **self._log_extra(),
                    "stored_fingerprint": record.fingerprint,
                    "received_fingerprint": self.fingerprint,
                },
            )
            if self.on_mismatch == "raise":
                # Leave our transaction first so the mismatch note survives the exception.
                self._atomic.__exit__(None, None, None)
                self._note_mismatch(record)
                raise mismatch
            self._note_mismatch(record)
        if app_settings.RECORD_DUPLICATES:
            record.duplicate_count += 1
            record.last_duplicate_at = timezone.now()
            ProcessedEvent.objects.using(self.using).filter(pk=record.pk).update(
                duplicate_count=F("duplicate_count") + 1, last_duplicate_at=record.last_duplicate_at
            )
        if logger.isEnabledFor(logging.INFO):  # the hot path: build no log record for nothing
            logger.info(
                "duplicate %s event %s discarded",
                self.consumer,
                self.event_id,
                extra=self._log_extra(),
            )
        signals.duplicate_discarded.send(
            sender=ProcessedEvent, consumer=self.consumer, event_id=self.event_id, record=record
        )
        return self

    def _note_mismatch(self, record: ProcessedEvent) -> None:
        record.mismatch_fingerprint = self.fingerprint
        record.mismatch_at = timezone.now()
        record.mismatch_payload = self.payload
        ProcessedEvent.objects.using(self.using).filter(pk=record.pk).update(
            mismatch_fingerprint=record.mismatch_fingerprint,
            mismatch_at=record.mismatch_at,
            mismatch_payload=record.mismatch_payload,
        )
        signals.payload_mismatch.send(
            sender=ProcessedEvent,
            consumer=self.consumer,
            event_id=self.event_id,
            record=record,
            stored_fingerprint=record.fingerprint,
            received_fingerprint=self.fingerprint,
        )

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._token is not None:
            _active.reset(self._token)
            self._token = None
        try:
            if exc_type is None and self.created:
                self._finish()
        except BaseException:
            self._atomic.__exit__(*sys.exc_info())
            raise
        self._atomic.__exit__(exc_type, exc, tb)

    def _finish(self) -> None:
        record = self.record
        assert record is not None
        changes: dict[str, Any] = {}
        if self._outcome != record.outcome:
            changes.update(outcome=self._outcome, reason=self._reason)
        if self.store_result and self.result is not None:
            changes["result"] = self.result
        if changes:
            # One UPDATE, and only when there is something to keep: most handlers return None.
            for name, value in changes.items():
                setattr(record, name, value)
            record.save(using=self.using, update_fields=list(changes))
        if logger.isEnabledFor(logging.INFO):  # the hot path: build no log record for nothing
            logger.info(
                "%s event %s %s",
                self.consumer,
                self.event_id,
                record.outcome,
                extra={**self._log_extra(), "outcome": record.outcome},
            )
        signals.event_processed.send(
            sender=ProcessedEvent, consumer=self.consumer, event_id=self.event_id, record=record
        )
        if record.outcome == Outcome.REJECTED:
            signals.event_rejected.send(
                sender=ProcessedEvent,
                consumer=self.consumer,
                event_id=self.event_id,
                record=record,
                reason=record.reason,
            )


def current_claim() -> idempotent | None:
    """The innermost claim being processed in this context, if any."""
    return _active.get()


def reject(reason: str) -> None:
    """Mark the event being processed as rejected: a final outcome, kept, never retried.

    The business writes made so far still commit (a rejected order row, say); only the inbox
    record's outcome changes. Outside a claim it raises :class:`TransactionRequired`.
    """
    active = _active.get()
    if active is None:
        raise TransactionRequired("reject() must be called while an event is being processed")
    active.reject(reason)
