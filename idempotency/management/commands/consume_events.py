"""Run a plain consumer loop (kombu or NATS JetStream) the way a worker is run."""

from __future__ import annotations

import json
import math
import signal
import threading
from collections import Counter
from types import FrameType
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils.module_loading import import_string

from idempotency.consumers import EventConsumer, Outcome
from idempotency.exceptions import IdempotencyConfigurationError, MissingExtra

ADAPTERS = ("kombu", "nats")


def _seconds(value: float | None, name: str, *, allow_zero: bool = False) -> None:
    if value is None:
        return
    low_ok = value >= 0 if allow_zero else value > 0
    if not (math.isfinite(value) and low_ok and value <= 86_400):
        raise CommandError(f"{name} must be a number of seconds, more than 0 and at most 86400")


def _json_value(text: str) -> tuple[Any, str | None]:
    """*text* read as JSON, with the first NaN or infinite number in it (else None)."""
    not_finite: list[str] = []

    def number(literal: str) -> float:
        value = float(literal)
        if not math.isfinite(value):  # 1e400 is valid JSON and reads as inf
            not_finite.append(literal)
        return value

    def constant(literal: str) -> float:
        # json.loads accepts NaN, Infinity and -Infinity (not JSON at all): a NaN visibility
        # timeout made the Redis consumer fail every poll and reconnect forever.
        not_finite.append(literal)
        return float(literal)

    # Noted, not raised: "NaNny" stops being JSON only after its NaN was read, and is text.
    value = json.loads(text, parse_constant=constant, parse_float=number)
    return value, (not_finite[0] if not_finite else None)


def _transport_options(pairs: list[str]) -> dict[str, Any]:
    """``NAME=VALUE`` pairs as a dict; a VALUE that is JSON (``2``, ``false``, ``["a"]``) is
    read as such, any other as text. NaN and infinite numbers are refused, and
    ``visibility_timeout`` is checked as ``--visibility-timeout`` is."""
    options: dict[str, Any] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        name = name.strip()
        if not sep or not name:
            raise CommandError(f"--transport-option {pair!r}: expected NAME=VALUE")
        try:
            options[name], not_finite = _json_value(value)
        except ValueError:
            options[name] = value
            continue
        if not_finite is not None:
            raise CommandError(f"--transport-option {name}: {not_finite} is not a finite number")
    if "visibility_timeout" in options:
        visibility = options["visibility_timeout"]
        what = "--transport-option visibility_timeout"
        # bool is an int: true would be a timeout of one second.
        if isinstance(visibility, bool) or not isinstance(visibility, (int, float)):
            raise CommandError(
                f"{what} must be a number of seconds, more than 0 and at most 86400, "
                f"not {visibility!r:.80}"
            )
        _seconds(visibility, what)
    return options


def _check_transport(transport: str | None) -> None:
    """Refuse a --transport that names no kombu transport, before the URL is looked at (an
    unknown alias would otherwise be reported as a bad --url)."""
    if not transport:
        return
    from kombu.transport import TRANSPORT_ALIASES, resolve_transport

    try:
        resolve_transport(transport)
    except (KeyError, ValueError, ImportError, AttributeError) as exc:
        reason = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        accepted = ", ".join(sorted(TRANSPORT_ALIASES, key=str.lower))
        raise CommandError(
            f"--transport {transport!r}: unknown transport ({reason}); accepted: an alias "
            f"({accepted}) or a module:Class path"
        ) from None


class Command(BaseCommand):
    help = (
        "Consume events from a broker with a handler of yours, outside Celery: each message is "
        "processed inside the inbox's transaction and acknowledged only after it commits (or "
        "after its dead letter is stored); otherwise it goes back to the broker. SIGTERM or "
        "SIGINT finishes the message in hand, acknowledges it and exits 0. "
        "kombu: --url and --queue (RabbitMQ, Redis, SQS); nats: --stream, --subject, --durable."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("adapter", choices=ADAPTERS, help="the broker client")
        parser.add_argument(
            "--handler",
            required=True,
            help="dotted path of the handler, a callable taking the decoded event",
        )
        parser.add_argument(
            "--consumer", help="the inbox's consumer name (default: the handler's dotted path)"
        )
        parser.add_argument("--key", help="the event's key path (default: the KEY setting)")
        parser.add_argument("--url", help="kombu: the broker URL (amqp://, redis://, sqs://)")
        parser.add_argument(
            "--queue", action="append", default=[], help="kombu: a queue to consume (repeatable)"
        )
        parser.add_argument(
            "--visibility-timeout",
            type=int,
            help="kombu on Redis or SQS: seconds before a message left unacknowledged (the "
            "consumer died) is given out again (the transport's visibility_timeout; kombu's "
            "default on Redis is 3600)",
        )
        parser.add_argument(
            "--transport",
            help="kombu: the transport, an alias or a module:Class path (default: the URL's "
            "scheme), such as a transport of your own for SQS",
        )
        parser.add_argument(
            "--transport-option",
            action="append",
            default=[],
            metavar="NAME=VALUE",
            help="kombu: a transport option (repeatable); the value is read as JSON, else as text",
        )
        parser.add_argument(
            "--servers", default="nats://127.0.0.1:4222", help="nats: the server URL(s), comma"
        )
        parser.add_argument("--stream", help="nats: the JetStream stream")
        parser.add_argument("--subject", help="nats: the subject (filter) to consume")
        parser.add_argument("--durable", help="nats: the durable pull consumer's name")
        parser.add_argument(
            "--ack-wait", type=float, default=60.0, help="nats: seconds before a redelivery"
        )
        parser.add_argument("--limit", type=int, help="stop after this many messages")
        parser.add_argument(
            "--idle-timeout", type=float, help="stop after this many seconds with no message"
        )
        parser.add_argument(
            "--transient-window",
            type=float,
            help="seconds a transient database error is waited out before the message goes "
            "back (default: TRANSIENT_RETRY_WINDOW)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        events = self._event_consumer(options)
        stop = threading.Event()
        counts: Counter[str] = Counter()
        verbosity = int(options["verbosity"])

        def report(outcome: Outcome) -> None:
            counts[outcome.status] += 1
            if verbosity >= 2:
                self.stdout.write(f"{outcome.status} {outcome.event_id}".rstrip())

        adapter = self._adapter(options, events, report)
        previous = self._on_stop_signals(stop)
        where = (
            ", ".join(options["queue"])
            if options["adapter"] == "kombu"
            else f"{options['stream']}/{options['subject']}"
        )
        self.stdout.write(f"consuming {where} with {events.consumer} (SIGTERM to stop)")
        try:
            handled = adapter.run_sync(
                stop=stop, limit=options["limit"], idle_timeout=options["idle_timeout"]
            )
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        summary = ", ".join(f"{count} {status}" for status, count in sorted(counts.items()))
        self.stdout.write(
            self.style.SUCCESS(
                f"stopped after {handled} message(s)" + (f": {summary}" if summary else "")
            )
        )

    def _event_consumer(self, options: dict[str, Any]) -> EventConsumer:
        path = options["handler"]
        try:
            handler = import_string(path)
        except ImportError as exc:
            raise CommandError(f"--handler {path!r} cannot be imported: {exc}") from None
        limit = options["limit"]
        if limit is not None and limit < 1:
            raise CommandError("--limit must be at least 1")
        _seconds(options["idle_timeout"], "--idle-timeout")
        _seconds(options["transient_window"], "--transient-window", allow_zero=True)
        try:
            return EventConsumer(
                handler,
                consumer=options["consumer"] or path,
                key=options["key"] or None,
                transient_window=options["transient_window"],
            )
        except IdempotencyConfigurationError as exc:
            raise CommandError(str(exc)) from None

    def _adapter(self, options: dict[str, Any], events: EventConsumer, report: Any) -> Any:
        if options["adapter"] == "kombu":
            if not options["url"]:
                raise CommandError("kombu needs --url (the broker URL)")
            if not options["queue"]:
                raise CommandError("kombu needs at least one --queue")
            try:
                from idempotency.consumers.kombu import KombuConsumer
            except MissingExtra as exc:
                raise CommandError(str(exc)) from exc
            transport_options = _transport_options(options["transport_option"])
            visibility = options["visibility_timeout"]
            _seconds(visibility, "--visibility-timeout")
            if visibility is not None:
                if "visibility_timeout" in transport_options:
                    # Two values for one setting: neither silently wins.
                    raise CommandError(
                        "--visibility-timeout and --transport-option visibility_timeout= "
                        "both set the visibility timeout: give only one"
                    )
                transport_options["visibility_timeout"] = visibility
            _check_transport(options["transport"])
            try:
                return KombuConsumer(
                    options["url"],
                    options["queue"],
                    events,
                    on_outcome=report,
                    transport=options["transport"] or None,
                    transport_options=transport_options,
                )
            except (ImportError, AttributeError) as exc:  # a transport path that names nothing
                raise CommandError(f"--transport {options['transport']!r}: {exc}") from None
            except (KeyError, ValueError) as exc:  # the URL's scheme names no transport, or
                # the URL is malformed (a --transport was checked above)
                raise CommandError(f"--url {options['url']!r}: {exc}") from None
        missing = [name for name in ("stream", "subject", "durable") if not options[name]]
        if missing:
            raise CommandError("nats needs " + ", ".join(f"--{name}" for name in missing))
        _seconds(options["ack_wait"], "--ack-wait")
        try:
            from idempotency.consumers.nats import JetStreamConsumer
        except MissingExtra as exc:
            raise CommandError(str(exc)) from exc
        servers = [url.strip() for url in options["servers"].split(",") if url.strip()]
        if not servers:
            raise CommandError("--servers names no server")
        try:
            return JetStreamConsumer(
                events,
                servers=servers,
                stream=options["stream"],
                subject=options["subject"],
                durable=options["durable"],
                ack_wait=options["ack_wait"],
                on_outcome=report,
            )
        except ValueError as exc:
            raise CommandError(str(exc)) from None

    def _on_stop_signals(self, stop: threading.Event) -> dict[int, Any]:
        def request_stop(signum: int, frame: FrameType | None) -> None:
            # Only a flag: the message in hand is finished and acknowledged first.
            stop.set()

        previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():  # call_command in a thread
            for signum in (signal.SIGTERM, signal.SIGINT):
                previous[signum] = signal.signal(signum, request_stop)
        return previous
