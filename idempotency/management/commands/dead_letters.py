"""List, show and re-drive dead letters."""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from idempotency import deadletters
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
        done, skipped = deadletters.redrive(letters)
        for letter in skipped:
            self.stderr.write(
                f"dead letter {letter.pk} cannot be re-driven: it names no task or arguments "
                f"({letter.get_reason_display()})"
            )
        self.stdout.write(f"re-drove {len(done)} dead letter(s) through the outbox")

    @staticmethod
    def _get(pk: int) -> DeadLetter:
        try:
            return DeadLetter.objects.get(pk=pk)
        except DeadLetter.DoesNotExist:
            raise CommandError(f"there is no dead letter {pk}") from None
