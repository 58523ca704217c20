"""The task base class of ``@idempotent_task``: what becomes of each delivery.

See :mod:`idempotency.celery` for the rule it follows.
"""

from __future__ import annotations

import contextlib
import logging
import traceback
from typing import Any, NoReturn

from celery.contrib.django.task import DjangoTask
from celery.exceptions import Ignore, Reject, Retry
from celery.utils.time import get_exponential_backoff_interval

from .. import deadletters
from ..conf import app_settings
from ..exceptions import AfterCommitError, InvalidEvent, InvalidEventId
from ..inbox import inbox_database
from ..keys import KeySpec, extract_key
from ..transient import TRANSIENT_ERRORS, is_transient
from ..transient import TransientWait as _TransientWait
from ..transient import drop_connections as _drop_connections

logger = logging.getLogger("idempotency")

#: The header RabbitMQ quorum queues count deliveries in (0 or absent on a first delivery).
DELIVERY_COUNT_HEADER = "x-delivery-count"

#: Control flow of Celery's own: never a failure of the event.
_CELERY_SIGNALS = (Retry, Reject, Ignore)


class _Decided(Reject):
    """A reject the wrapper raises once it has decided the message's fate (a handler's own
    ``Reject`` is judged like a failure first)."""


def delivery_number(request: Any) -> int | None:
    """``0`` when *request* is a redelivery of its message (count it durably), None otherwise.

    RabbitMQ quorum queues send ``x-delivery-count``; RabbitMQ classic queues and kombu's Redis
    transport (which sets it when it restores an unacknowledged or requeued message) flag a
    redelivery in ``delivery_info["redelivered"]``. Either way the delivery is counted in
    :class:`~idempotency.models.DeliveryAttempt`. The filesystem transport flags nothing: its
    deliveries are not counted.
    """
    # The broker's own count includes the deliveries the wrapper gave back itself (an outage
    # waited out): only the durable counter, which takes those back, can tell them from deaths.
    # RabbitMQ 3.10 sends x-delivery-count 0 on a quorum queue's first delivery: not a redelivery.
    if getattr(request, DELIVERY_COUNT_HEADER, None) not in (None, 0):
        return 0
    info = getattr(request, "delivery_info", None) or {}
    if info.get("redelivered") or getattr(request, "redelivered", False):
        return 0
    return None


class IdempotentTask(DjangoTask):
    """Base of ``@idempotent_task`` tasks: decides what becomes of each delivery (see the module).

    ``retry_for`` (the decorator's ``autoretry_for``) lists the errors retried with the task's
    retries and backoff, as Celery's ``autoretry_for`` would; transient database errors are not
    among them: they are waited out without consuming a retry.
    """

    idempotent = True
    key_spec: KeySpec | None = None
    consumer_name: str | None = None
    #: The database of the task's inbox (the decorator's ``using``); None: the router's choice.
    inbox_using: str | None = None
    retry_for: tuple[type[BaseException], ...] = ()
    dont_retry_for: tuple[type[BaseException], ...] = ()

    def deliver(self, event: Any, args: tuple[Any, ...], kwargs: dict[str, Any], apply: Any) -> Any:
        """Process one delivery with *apply* (the claim and the handler); see the module."""
        wait: _TransientWait | None = None
        counted = False
        while True:
            try:
                if not counted:
                    # Once per delivery, however many attempts the transient waits make.
                    if self._over_delivery_limit(event, args, kwargs):
                        return None
                    counted = True
                return apply()
            except _Decided:
                raise
            except Reject as exc:
                if getattr(exc, "requeue", False):
                    raise
                # The handler's own reject without requeue would let the message go with
                # nothing kept (its effect rolled back): it needs a dead letter first.
                self._refuse(deadletters.FAILED, exc, event, args, kwargs)
            except _CELERY_SIGNALS:
                raise
            except AfterCommitError as exc:
                # Applied and committed: acknowledge. Failing the task would dead-letter an event
                # whose effect exists, and a re-drive after a purge would apply it twice.
                logger.error(
                    "%s applied event %s, then an on_commit callback raised: %r",
                    self.name,
                    exc.event_id,
                    exc.__cause__,
                    exc_info=exc,
                    extra={"consumer": exc.consumer, "event_id": exc.event_id},
                )
                return None
            except InvalidEventId as exc:
                self._refuse(deadletters.INVALID_KEY, exc, event, args, kwargs)
            except InvalidEvent as exc:
                self._refuse(deadletters.INVALID_EVENT, exc, event, args, kwargs)
            except Exception as exc:
                if not (isinstance(exc, TRANSIENT_ERRORS) and is_transient(exc)):
                    self._retry_or_fail(exc, event, args, kwargs)
                if wait is None:
                    wait = _TransientWait(self._transient_window())
                try:
                    _drop_connections()
                    waited = wait.pause()
                except Exception as interrupted:
                    # A soft time limit firing in the pause: escaping to on_failure, the message
                    # would be rejected without requeue, and its dead letter could not be stored.
                    self._give_back(interrupted, cause=exc)
                if not waited:
                    logger.warning(
                        "%s[%s]: the database is still unavailable (%r): the message goes back "
                        "to the broker",
                        self.name,
                        self.request.id,
                        exc,
                        extra={"consumer": self._consumer(), "event_id": self._event_id([event])},
                    )
                    self._give_back(exc)
                # The first wait is worth a warning; the rest of an outage would flood the log.
                logger.log(
                    logging.WARNING if wait.pauses == 1 else logging.INFO,
                    "%s[%s]: transient database error, attempt %d again: %r",
                    self.name,
                    self.request.id,
                    wait.pauses + 1,
                    exc,
                )

    def _give_back(self, exc: BaseException, *, cause: BaseException | None = None) -> NoReturn:
        """Requeue the message: its fate is not decided, and this delivery is no death.

        The next delivery comes flagged as a redelivery and is counted; this one reached an
        outcome (the wrapper gave it back), so its count is taken back: an outage, however many
        windows it lasts, never spends the delivery limit. Best effort, on a failure path.
        """
        if getattr(self.request, "idempotency_counted", False):
            from django.db.models import F

            from ..models import DeliveryAttempt

            # The database may be the very thing that is down: then the count stays.
            with contextlib.suppress(Exception):
                DeliveryAttempt.objects.filter(task_id=self.request.id, deliveries__gt=1).update(
                    deliveries=F("deliveries") - 1
                )
        raise _Decided(exc, requeue=True) from (cause or exc)  # type: ignore[arg-type]

    def retry(self, *args: Any, **kwargs: Any) -> Any:
        """Celery's retry, except that a retry it cannot publish gives the message back.

        Celery raises ``Reject(requeue=False)`` then, which would drop the message over a broker
        error; this holds for a retry the handler asks for itself too (``bind=True``).
        """
        try:
            return super().retry(*args, **kwargs)
        except _Decided:
            raise
        except Reject as rejected:
            if getattr(rejected, "requeue", False):
                raise
            self._give_back(getattr(rejected, "reason", None) or rejected, cause=rejected)

    def _transient_window(self) -> float:
        window = app_settings.TRANSIENT_RETRY_WINDOW.total_seconds()
        # A wait that outlasts the time limit would end in a kill, which counts as a delivery:
        # an outage must not spend the delivery limit, so the wait stays well inside the limit.
        limits = [
            limit
            for limit in (*(getattr(self.request, "timelimit", None) or ()), self.soft_time_limit)
            if limit
        ]
        if self.time_limit:
            limits.append(self.time_limit)
        return min([window, *(float(limit) / 2 for limit in limits)])

    def _over_delivery_limit(self, event: Any, args: Any, kwargs: Any) -> bool:
        """Count a redelivery; True when it was past ``DELIVERY_LIMIT`` and is a duplicate."""
        limit = app_settings.DELIVERY_LIMIT
        request = self.request
        if limit is None or not request.id:
            return False
        if delivery_number(request) is None:
            return False  # a first delivery: the hot path writes nothing
        from ..models import DeliveryAttempt

        event_id = self._event_id([event])
        deliveries = DeliveryAttempt.objects.count_delivery(
            request.id, task_name=self.name, event_id=event_id
        )
        request.idempotency_counted = True  # type: ignore[attr-defined]
        if deliveries <= limit:
            return False
        if event_id and self._in_inbox(event_id):
            logger.warning(
                "%s[%s]: delivery %d of event %s, which is already processed: acknowledged",
                self.name,
                request.id,
                deliveries,
                event_id,
                extra={"consumer": self._consumer(), "event_id": event_id},
            )
            return True
        exc = RuntimeError(
            f"delivered {deliveries} times (DELIVERY_LIMIT is {limit}): each delivery ended "
            "without an outcome (the worker was killed or lost)"
        )
        letter = deadletters.record(
            reason=deadletters.DELIVERY_LIMIT,
            task_name=self.name,
            task_id=request.id,
            event_id=event_id,
            args=[event, *args],
            kwargs=kwargs,
            exception=exc,
            attempts=deliveries,
        )
        raise _Decided(exc, requeue=letter is None)

    def _in_inbox(self, event_id: str) -> bool:
        from ..models import ProcessedEvent

        using = self.inbox_using or inbox_database()
        records = ProcessedEvent.objects.using(using).for_consumer(self._consumer())
        return records.for_event(event_id).exists()

    def _refuse_without_event(self, kwargs: dict[str, Any]) -> NoReturn:
        """A message with no event argument: an invalid event (see :meth:`_refuse`)."""
        exc = InvalidEvent(
            f"{self.name} got a message with no event: the event is the task's first argument"
        )
        self._refuse(deadletters.INVALID_EVENT, exc, None, (), kwargs, message_args=[])

    def _refuse(
        self,
        reason: str,
        exc: Exception,
        event: Any,
        args: Any,
        kwargs: Any,
        *,
        message_args: list[Any] | None = None,
    ) -> NoReturn:
        """An event that can never be processed: a dead letter, and no requeue once stored."""
        logger.error(
            "%s refused a message: %s",
            self.name,
            exc,
            extra={"consumer": self._consumer()},
        )
        if self._dead_letter(reason, exc, event, args, kwargs, message_args=message_args) is None:
            self._give_back(exc)
        raise _Decided(exc, requeue=False) from exc

    def _dead_letter(
        self,
        reason: str,
        exc: Exception,
        event: Any,
        args: Any,
        kwargs: Any,
        attempts: int = 1,
        *,
        message_args: list[Any] | None = None,
    ) -> Any:
        """Store this delivery as a dead letter; None when it could not be stored.

        *message_args* are the message's arguments when they are not *event* and *args*.
        """
        return deadletters.record(
            reason=reason,
            task_name=self.name,
            task_id=self.request.id or "",
            event_id=self._event_id([event]) if message_args is None else "",
            args=[event, *args] if message_args is None else message_args,
            kwargs=kwargs,
            exception=exc,
            traceback=_format(exc),
            attempts=attempts,
        )

    def _retry_or_fail(self, exc: Exception, event: Any, args: Any, kwargs: Any) -> NoReturn:
        if isinstance(exc, self.retry_for) and not isinstance(exc, self.dont_retry_for):
            # The options Celery's autoretry_for reads, with its defaults.
            options = dict(getattr(self, "retry_kwargs", None) or {})
            backoff = getattr(self, "retry_backoff", False)
            if backoff:
                options["countdown"] = get_exponential_backoff_interval(
                    factor=int(max(1.0, float(backoff))),
                    retries=self.request.retries,
                    maximum=int(getattr(self, "retry_backoff_max", 600)),
                    full_jitter=getattr(self, "retry_jitter", True),
                )
            try:
                # retry() gives the message back itself when the retry cannot be published.
                raise self.retry(exc=exc, **options)
            except (Retry, Reject):
                raise
            except Exception:
                pass  # retries exhausted (Celery re-raises exc): a final failure
        self._fail(exc, event, args, kwargs)

    def _fail(self, exc: Exception, event: Any, args: Any, kwargs: Any) -> NoReturn:
        """A final failure: re-raised once its dead letter is stored, given back otherwise."""
        attempts = (self.request.retries or 0) + 1
        letter = self._dead_letter(deadletters.FAILED, exc, event, args, kwargs, attempts)
        if letter is None:
            logger.error(
                "%s[%s] failed for good, but its dead letter could not be stored: the message "
                "goes back to the broker",
                self.name,
                self.request.id,
                exc_info=exc,
            )
            self._give_back(exc)
        # The task fails as usual (its state, signals and log); Celery then rejects the message
        # without requeue (acks_on_failure_or_timeout=False), and on_failure stores nothing more.
        self.request.idempotency_dead_letter = letter.pk  # type: ignore[attr-defined]
        raise exc

    def on_failure(
        self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any
    ) -> None:
        if getattr(self.request, "idempotency_dead_letter", None) is not None:
            return
        if isinstance(exc, _CELERY_SIGNALS):
            # This hook raised it (below): Celery reports it to this hook a second time.
            return
        # A failure that did not go through deliver(): Celery's own, after the task returned (a
        # result the backend cannot encode, a callback that cannot be sent).
        letter = deadletters.record(
            reason=deadletters.FAILED,
            task_name=self.name,
            task_id=task_id,
            args=args,
            kwargs=kwargs,
            event_id=self._event_id(args),
            exception=exc,
            traceback=str(einfo) if einfo else "",
            attempts=(self.request.retries or 0) + 1,
        )
        if letter is None:
            # Celery would reject the message without requeue (acks_on_failure_or_timeout=False):
            # with nothing stored, it goes back to the broker instead, as the reject this raises
            # reaches the worker's request.
            logger.error(
                "%s[%s] failed outside its delivery, and its dead letter could not be stored: "
                "the message goes back to the broker",
                self.name,
                task_id,
                exc_info=exc,
            )
            self._give_back(exc)

    def _consumer(self) -> str:
        return self.consumer_name or self.name

    def _event_id(self, args: Any) -> str:
        if not args:
            return ""
        try:
            spec = self.key_spec if self.key_spec is not None else app_settings.KEY
            return extract_key(args[0], spec)
        except Exception:  # any event, however malformed: the id is only a label here
            return ""


def _format(exc: BaseException) -> str:
    try:
        return "".join(traceback.format_exception(exc))
    except Exception:
        return ""
