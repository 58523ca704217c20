"""List, show and re-drive dead letters."""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from idempotency import deadletters
from idempotency.exceptions import MissingExtra
from idempotency.extras import require
from idempotency.models import DeadLetter


class Command(BaseCommand):
    help = "Inspect and re-drive the messages that could not be processed (dead letters)."

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        listing = sub.add_parser("list", help="the dead letters, newest first")
        listing.add_argument(
            "--all", dest="everything", action="store_true", help="include re-driven ones"
        )
        listing.add_argument("--task", help="only this task")
        listing.add_argument("--limit", type=int, default=50)
        show = sub.add_parser("show", help="one dead letter in full")
        show.add_argument("id", type=int)
        redrive = sub.add_parser("redrive", help="publish dead letters again (after a fix)")
        redrive.add_argument("ids", type=int, nargs="*", help="dead letter ids")
        redrive.add_argument(
            "--all", dest="everything", action="store_true", help="every pending dead letter"
        )
        redrive.add_argument("--task", help="with --all: only this task")
        imports = sub.add_parser(
            "import",
            help="move the messages of RabbitMQ or SQS dead-letter queues into dead letters "
            "(reason broker), so list and redrive see them",
        )
        imports.add_argument(
            "--queue",
            dest="queues",
            action="append",
            metavar="NAME",
            help="a dead-letter queue to drain (repeatable; default: <queue>.dead of every "
            "queue in CELERY_TASK_QUEUES that RabbitMQ dead-letters)",
        )
        imports.add_argument("--broker", help="the broker URL (default: CELERY_BROKER_URL)")
        imports.add_argument("--limit", type=int, help="take at most this many messages per queue")
        imports.add_argument(
            "--dry-run", action="store_true", help="count what would be imported; take nothing"
        )

    def handle(self, *args: Any, action: str, **options: Any) -> None:
        getattr(self, f"_{action}")(**options)

    def _list(self, *, everything: bool, task: str | None, limit: int, **options: Any) -> None:
        letters = DeadLetter.objects.all() if everything else DeadLetter.objects.pending()
        if task:
            letters = letters.filter(task_name=task)
        total = letters.count()
        for letter in letters[:limit]:
            redriven = (
                f" re-driven {letter.redriven_at:%Y-%m-%d %H:%M}" if letter.redriven_at else ""
            )
            self.stdout.write(
                f"{letter.pk:>6}  {letter.created_at:%Y-%m-%d %H:%M:%S}  {letter.reason:<12}  "
                f"{letter.task_name or '-'}  {letter.event_id or '-'}  "
                f"{letter.exception[:80]}{redriven}"
            )
        self.stdout.write(f"{total} dead letter(s){'' if everything else ' pending'}")

    def _show(self, *, id: int, **options: Any) -> None:
        letter = self._get(id)
        for field in DeadLetter._meta.concrete_fields:
            value = getattr(letter, field.attname)
            if isinstance(value, (dict, list)):
                value = json.dumps(value, indent=2, sort_keys=True)
            self.stdout.write(f"{field.name}: {value}")

    def _redrive(
        self, *, ids: list[int], everything: bool, task: str | None, **options: Any
    ) -> None:
        if bool(ids) == everything:
            raise CommandError("give dead letter ids, or --all (not both)")
        if everything:
            pending = DeadLetter.objects.pending()
            letters = list(pending.filter(task_name=task) if task else pending)
        else:
            letters = [self._get(pk) for pk in ids]
        result = deadletters.redrive(letters)
        for letter in result.skipped:
            self.stderr.write(
                f"dead letter {letter.pk} cannot be re-driven: it names no task or arguments "
                f"({letter.get_reason_display()})"
            )
        for refusal in result.refused:
            self.stderr.write(f"dead letter {refusal.letter.pk} left alone: {_why(refusal)}")
        left = f", left {len(result.refused)} alone" if result.refused else ""
        self.stdout.write(f"re-drove {len(result.done)} dead letter(s) through the outbox{left}")

    def _import(
        self,
        *,
        queues: list[str] | None,
        broker: str | None,
        limit: int | None,
        dry_run: bool,
        verbosity: int = 1,
        **options: Any,
    ) -> None:
        try:
            require("celery", "manage.py dead_letters import", "celery", "kombu")
        except MissingExtra as exc:
            raise CommandError(str(exc)) from exc
        from celery import current_app
        from kombu import Connection

        if limit is not None and limit < 1:
            raise CommandError(f"--limit must be at least 1, not {limit}")
        conf = current_app.conf
        names = queues or deadletters.dead_letter_queue_names(conf.task_queues or ())
        if not names:
            raise CommandError(
                "no dead-letter queue to import: give --queue, or declare CELERY_TASK_QUEUES "
                "with an x-dead-letter-exchange (see project.queues.work_queue)"
            )
        with Connection(broker or conf.broker_url, connect_timeout=10) as connection:
            # SQS: <queue>-dead, where the work queue's redrive policy moves a message.
            if connection.transport.driver_type not in ("amqp", "sqs"):
                raise CommandError(
                    f"dead_letters import reads RabbitMQ and SQS dead-letter queues; the broker "
                    f"{connection.as_uri()} is {connection.transport.driver_type}, which keeps "
                    "none (its failed messages are already dead letters in the database)"
                )
            for name in names:
                self._import_queue(connection, name, conf, limit, dry_run, verbosity)

    def _import_queue(
        self,
        connection: Any,
        name: str,
        conf: Any,
        limit: int | None,
        dry_run: bool,
        verbosity: int,
    ) -> None:
        channel = connection.channel()
        try:
            try:
                _, waiting, _ = channel.queue_declare(queue=name, passive=True)
            except connection.channel_errors as exc:
                raise CommandError(f"there is no queue {name!r} on the broker ({exc})") from None
            if verbosity >= 1:
                self.stdout.write(f"{name}: {waiting:,} message(s) waiting")
            taken = [0]

            def progress(outcome: str, message: deadletters.BrokerMessage) -> None:
                taken[0] += 1
                if verbosity >= 2 or outcome == "failed":
                    what = f"{message.task_name or '?'}[{message.task_id or '?'}]"
                    self.stdout.write(f"  {outcome} {what}")
                elif verbosity >= 1 and taken[0] % 100 == 0:
                    self.stdout.write(f"  {taken[0]:,} taken")

            result = deadletters.import_broker_queue(
                channel,
                name,
                accept=conf.accept_content,
                limit=limit,
                dry_run=dry_run,
                progress=progress,
            )
        finally:
            # A dry run's messages, and one that could not be stored, go back to the queue.
            channel.close()
        verb = "would import" if dry_run else "imported"
        self.stdout.write(
            f"{name}: {verb} {result.imported:,} dead letter(s), skipped {result.skipped:,} "
            "already stored"
        )
        if result.interrupted:
            raise CommandError(
                f"{name}: a dead letter could not be stored (see the log); the message and "
                "those after it stay in the queue: run the import again once the database is back"
            )

    @staticmethod
    def _get(pk: int) -> DeadLetter:
        try:
            return DeadLetter.objects.get(pk=pk)
        except DeadLetter.DoesNotExist:
            raise CommandError(f"there is no dead letter {pk}") from None


def _why(refusal: Any) -> str:
    """Why ``redrive()`` refused a letter, and what to do instead."""
    from idempotency.deadletters import redriving

    letter = refusal.letter
    if refusal.reason == redriving.ALREADY_REDRIVEN:
        when = f"{letter.redriven_at:%Y-%m-%d %H:%M:%S}" if letter.redriven_at else "?"
        return (
            f"already re-driven ({letter.redrive_count}x, last {when}); a re-drive that failed "
            "again is a dead letter of its own"
        )
    processed = f"{letter.task_name} already processed {letter.event_id}"
    if refusal.reason == redriving.MISMATCH:
        return (
            f"{processed}, and this letter is its payload mismatch: published again it would "
            "be dead-lettered again; to apply the new payload, forget the inbox record first"
        )
    return (
        f"{processed} ({refusal.outcome or 'processed'}): published again it would be "
        "discarded as a duplicate"
    )
