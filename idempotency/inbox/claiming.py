"""The one primitive: claim (consumer, event id) in the same transaction as the effect.

Everything else in the app (the Celery decorator, the handler decorator) is a thin layer over
:class:`idempotent`.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from contextvars import ContextVar
from types import TracebackType
from typing import Any

from django.core.serializers.json import DjangoJSONEncoder
from django.db import DEFAULT_DB_ALIAS, connections, router, transaction
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import F
from django.db.transaction import TransactionManagementError
from django.utils import timezone

from .. import signals
from ..conf import MISMATCH_POLICIES, app_settings
from ..exceptions import (
    AfterCommitError,
    IdempotencyConfigurationError,
    InvalidEvent,
    PayloadMismatch,
    ResultNotSerializable,
    TransactionRequired,
)
from ..fingerprint import (
    bounded_canonical_json,
    digest_hex,
    has_escaped_nul,
    sha256_hex,
    stored_json,
)
from ..keys import consumer_name, event_id_key
from .models import Outcome, ProcessedEvent
from .rows import StoredRecord
from .statements import RecordLoader, claim_statement
from .write_guard import guard_other_databases

logger = logging.getLogger("idempotency")

_NO_PAYLOAD = object()

#: libpq's PQTRANS_INERROR, as psycopg 3 (``info.transaction_status``) and psycopg2
#: (``get_transaction_status()``) report it: a statement failed, only a rollback is possible.
_PQTRANS_INERROR = 3

#: The innermost active claim, so code deep inside a handler can reject the event.
_active: ContextVar[idempotent | None] = ContextVar("idempotency_active_claim", default=None)


def inbox_database() -> str:
    """The database alias that holds the inbox, as the project's routers decide."""
    return router.db_for_write(ProcessedEvent) or DEFAULT_DB_ALIAS


def claim(
    consumer: str,
    event_id: Any,
    *,
    fingerprint: str = "",
    payload: Any = None,
    using: str | None = None,
) -> tuple[ProcessedEvent, bool]:
    """Claim *event_id* for *consumer*: ``(record, created)`` with ``get_or_create`` semantics.

    Must run inside ``transaction.atomic()`` on the inbox database, next to the business
    change, so the two commit or roll back together. A concurrent claim of the same key blocks
    until this transaction ends, then sees ``created=False`` (or ``True`` if this one rolled back).
    The id is validated as :func:`idempotency.keys.event_id_key` does (:class:`InvalidEventId`);
    *fingerprint* is ``""`` or a SHA-256 digest as 64 hex characters (:class:`InvalidEvent`).
    """
    return _claim(
        consumer_name(consumer),
        event_id_key(event_id),
        digest_hex(fingerprint),
        payload,
        using or inbox_database(),
    )


def _claim(
    consumer: str, event_id: str, fingerprint: str, payload: Any, using: str
) -> tuple[ProcessedEvent, bool]:
    load, created = _claim_lazily(consumer, event_id, fingerprint, payload, using)
    return load(), created


def _claim_lazily(
    consumer: str, event_id: str, fingerprint: str, payload: Any, using: str
) -> tuple[RecordLoader, bool]:
    """The claim, its record built only when ``load()`` is called."""
    if not connections[using].in_atomic_block:
        raise TransactionRequired(
            f"claim({consumer!r}, {event_id!r}) must run inside transaction.atomic(using={using!r})"
        )
    defaults = {"fingerprint": fingerprint, "payload": payload}
    return claim_statement(using).lazily(using, consumer, event_id, defaults)


class idempotent:  # noqa: N801 (used as a context manager, like transaction.atomic)
    """Run a block at most once per (consumer, event id)::

        with idempotent("billing.debit", event["eventId"], payload=event) as claim:
            if claim.duplicate:
                return claim.result
            account.debit(...)
            claim.result = {"balance": "90.00"}

    It opens ``transaction.atomic()`` (a savepoint when nested, unless ``savepoint=False``),
    claims the key, and commits the record with the block's writes. If the block raises, the
    record is rolled back with everything else, so a retry processes the event again. Whatever
    raises (the claim, a signal receiver, the result's encoding), the atomic block is left.

    A duplicate whose payload fingerprint differs from the stored one raises
    :class:`PayloadMismatch` from ``__enter__`` (the block does not run) or, with
    ``on_mismatch="discard"``, is discarded like any duplicate. Either way the mismatch is
    logged, signalled and recorded on the original row (unless an enclosing transaction of the
    caller's rolls back).

    The result is stored as JSON (``DjangoJSONEncoder``: dates, decimals and UUIDs become
    strings), after *result_serializer* if one is given; a result with no JSON form raises
    :class:`ResultNotSerializable` on leaving the block, which rolls the effect back. A payload
    deeper than ``MAX_EVENT_DEPTH``, larger than ``MAX_EVENT_BYTES`` or with no JSON form raises
    :class:`InvalidEvent` before anything runs.

    When the claim's transaction is the outermost one, it commits, and then an ``on_commit``
    callback raises, :class:`AfterCommitError` is raised from the callback's exception: the
    event was applied. With several databases configured, a write to a database other than
    *using* while the claim is open raises :class:`IdempotencyConfigurationError` before it runs,
    except to the aliases in *allow_writes_to* (see docs/databases.md).
    """

    def __init__(
        self,
        consumer: str,
        event_id: Any,
        *,
        payload: Any = _NO_PAYLOAD,
        on_mismatch: str | None = None,
        store_result: bool | None = None,
        store_payload: bool | None = None,
        result_serializer: Callable[[Any], Any] | None = None,
        allow_writes_to: Iterable[str] = (),
        using: str | None = None,
        savepoint: bool = True,
    ) -> None:
        self.consumer = consumer_name(consumer)
        self.event_id = event_id_key(event_id)
        if store_payload is None:
            store_payload = app_settings.STORE_PAYLOADS
        if payload is _NO_PAYLOAD:
            self.fingerprint = ""
            self.payload = None
        else:
            encoded = bounded_canonical_json(
                payload,
                max_depth=app_settings.MAX_EVENT_DEPTH,
                max_bytes=app_settings.MAX_EVENT_BYTES,
            )
            self.fingerprint = sha256_hex(encoded)
            self.payload = None
            if store_payload:
                # Stored in its JSON form, if every backend can hold it: the canonical encoding
                # lets NaN and NUL through, which the fingerprint never minded.
                try:
                    self.payload = stored_json(encoded, "the event")
                except ValueError as exc:
                    raise InvalidEvent(
                        f"{consumer} event {self.event_id!r} cannot be stored (STORE_PAYLOADS): "
                        f"{exc}"
                    ) from None
        self.on_mismatch = on_mismatch or app_settings.ON_MISMATCH
        if self.on_mismatch not in MISMATCH_POLICIES:
            raise IdempotencyConfigurationError(
                f"on_mismatch must be one of {', '.join(MISMATCH_POLICIES)}, "
                f"not {self.on_mismatch!r}"
            )
        self.store_result = app_settings.STORE_RESULTS if store_result is None else store_result
        self.result_serializer = result_serializer
        self.allow_writes_to = frozenset(allow_writes_to)
        self.using = using or inbox_database()
        self._atomic = transaction.atomic(using=self.using, savepoint=savepoint)
        self._record: ProcessedEvent | None = None
        self._load: RecordLoader | None = None
        self.created = False
        self.result: Any = None
        self._outcome = Outcome.PROCESSED
        self._reason = ""
        self._token: Any = None
        self._open = False
        self._committed = False
        self._guards: ExitStack | None = None

    @property
    def record(self) -> ProcessedEvent | None:
        """The inbox record claimed (None before the claim), built when first read: a first
        delivery that never reads it pays for no model instance.
        """
        if self._load is not None:
            self._record, self._load = self._load(), None
        return self._record

    @record.setter
    def record(self, value: ProcessedEvent | None) -> None:
        self._record, self._load = value, None

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

    def _mark_committed(self) -> None:
        self._committed = True

    def _close(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Leave the atomic block once, whichever path gets here first."""
        guards, self._guards = self._guards, None
        if guards is not None:
            guards.close()
        if self._open:
            self._open = False
            self._atomic.__exit__(exc_type, exc, tb)

    def __enter__(self) -> idempotent:
        connection = connections[self.using]
        outermost = not connection.in_atomic_block
        self._committed = False
        self._atomic.__enter__()
        self._open = True
        try:
            if outermost:
                # Registered first, so it runs first after the commit: a later callback that
                # raises is then known to have raised after a commit, not instead of one.
                connection.on_commit(self._mark_committed)
            self._enter()
        except BaseException:
            self._close(*sys.exc_info())
            raise
        return self

    def _enter(self) -> None:
        self._record = None
        # Straight to the statement: the atomic block was just entered, so _claim's check for
        # one has nothing to find.
        defaults = {"fingerprint": self.fingerprint, "payload": self.payload}
        self._load, self.created = claim_statement(self.using).lazily(
            self.using, self.consumer, self.event_id, defaults
        )
        if self.created:
            if len(connections.settings) > 1:  # one database: nothing to guard, no cost
                self._guards = guard_other_databases(self)
            self._token = _active.set(self)
            return
        # What a duplicate discarded needs, its stored result (and fingerprint), is read from
        # the selected row; the record is built only for a mismatch, a count or a receiver.
        stored = self._load
        if isinstance(stored, StoredRecord):
            self.result = stored.value("result")
            fingerprint = stored.value("fingerprint") if self.fingerprint else ""
        else:
            record = self.record
            assert record is not None
            self.result, fingerprint = record.result, record.fingerprint
        if self.fingerprint and fingerprint and self.fingerprint != fingerprint:
            record = self.record
            assert record is not None
            mismatch = PayloadMismatch(self.consumer, self.event_id, fingerprint, self.fingerprint)
            logger.warning(
                "payload mismatch for %s event %s: stored %s, received %s",
                self.consumer,
                self.event_id,
                fingerprint,
                self.fingerprint,
                extra={
                    **self._log_extra(),
                    "stored_fingerprint": fingerprint,
                    "received_fingerprint": self.fingerprint,
                },
            )
            if self.on_mismatch == "raise":
                # Leave our transaction first so the mismatch note survives the exception; the
                # note has an atomic block of its own, so a failing note or receiver leaves a
                # transaction of the caller's usable.
                self._close(None, None, None)
                with transaction.atomic(using=self.using):
                    self._note_mismatch(record)
                raise mismatch
            self._note_mismatch(record)
        if app_settings.RECORD_DUPLICATES:
            record = self.record
            assert record is not None
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
        if signals.duplicate_discarded.receivers:  # no receivers: no dispatch to build
            signals.duplicate_discarded.send(
                sender=ProcessedEvent,
                consumer=self.consumer,
                event_id=self.event_id,
                record=self.record,
            )

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
                self._require_usable_transaction()
                self._finish()
        except BaseException:
            self._close(*sys.exc_info())
            raise
        try:
            self._close(exc_type, exc, tb)
        except Exception as error:
            # Django runs the on_commit callbacks inside atomic's __exit__ and lets the first
            # failure escape: after our marker ran, the commit is behind us.
            if exc_type is None and self._committed:
                raise AfterCommitError(self.consumer, self.event_id) from error
            raise

    def _require_usable_transaction(self) -> None:
        """Raise if the block caught a database error and went on: Django would roll the claim
        back without a word (and PostgreSQL turn the COMMIT into a ROLLBACK, on_commit callbacks
        still run), so the caller would acknowledge an event that was neither applied nor kept.
        """
        connection = connections[self.using]
        if connection.needs_rollback or _aborted(connection):
            raise TransactionManagementError(
                f"{self.consumer} event {self.event_id!r}: a database error was caught inside the "
                "claim's block and the block went on; its transaction can only roll back, so the "
                "event is not applied. Wrap the statement that may fail in transaction.atomic() "
                "to catch its error."
            )

    def _stored_result(self) -> Any:
        value = self.result
        if self.result_serializer is not None:
            value = self.result_serializer(value)
        if value is None:
            return None
        try:
            # Encoded here, not in the UPDATE, so the error names the cause. Refused on every
            # backend as PostgreSQL's jsonb refuses them: NaN, a NUL, a lone surrogate.
            document = json.dumps(value, cls=DjangoJSONEncoder, allow_nan=False, ensure_ascii=False)
            document.encode()
            if has_escaped_nul(document):
                raise ValueError("a NUL character (\\u0000), which PostgreSQL cannot store")
        except (TypeError, ValueError, RecursionError) as exc:
            raise ResultNotSerializable(
                f"the result of {self.consumer} for event {self.event_id!r} cannot be stored as "
                f"JSON: {type(value).__name__} ({exc}). Return a dict of JSON values (or None), "
                "pass result_serializer=..., or store_result=False."
            ) from exc
        return value

    def _finish(self) -> None:
        # The record is built only if something reads or changes it: a first delivery with no
        # result to keep, no rejection and no receivers writes and builds nothing more.
        record = self._record
        outcome = Outcome.PROCESSED.value if record is None else record.outcome
        changes: dict[str, Any] = {}
        if self._outcome != outcome:
            changes.update(outcome=self._outcome, reason=self._reason)
            outcome = self._outcome
        if self.store_result and self.result is not None:
            value = self._stored_result()
            if value is not None:
                changes["result"] = value
        if changes:
            # One UPDATE, and only when there is something to keep: most handlers return None.
            record = self.record
            assert record is not None
            for name, value in changes.items():
                setattr(record, name, value)
            record.save(using=self.using, update_fields=list(changes))
        if logger.isEnabledFor(logging.INFO):  # the hot path: build no log record for nothing
            logger.info(
                "%s event %s %s",
                self.consumer,
                self.event_id,
                outcome,
                extra={**self._log_extra(), "outcome": outcome},
            )
        if signals.event_processed.receivers:
            signals.event_processed.send(
                sender=ProcessedEvent,
                consumer=self.consumer,
                event_id=self.event_id,
                record=self.record,
            )
        if outcome == Outcome.REJECTED and signals.event_rejected.receivers:
            record = self.record
            assert record is not None
            signals.event_rejected.send(
                sender=ProcessedEvent,
                consumer=self.consumer,
                event_id=self.event_id,
                record=record,
                reason=record.reason,
            )


def _aborted(connection: BaseDatabaseWrapper) -> bool:
    """Whether PostgreSQL has aborted the transaction (a failed statement): no query, the
    driver tracks it.
    """
    if connection.vendor != "postgresql" or connection.connection is None:
        return False
    raw = connection.connection
    info = getattr(raw, "info", None)
    if info is not None:  # psycopg 3
        return bool(info.transaction_status == _PQTRANS_INERROR)
    status = getattr(raw, "get_transaction_status", None)  # psycopg2
    return status is not None and status() == _PQTRANS_INERROR


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
