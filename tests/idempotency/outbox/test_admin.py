"""The outbox's admin: pending, published and failed rows; the logged re-drive of failed ones."""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib.admin.models import CHANGE, LogEntry
from django.contrib.auth.models import Permission
from django.test import Client
from django.utils import timezone

from idempotency import outbox
from idempotency.models import OutboxMessage
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db

URL = "/admin/idempotency/outboxmessage/"


@pytest.fixture
def admin_client_() -> Client:
    client = Client()
    client.force_login(UserFactory(username="root", is_staff=True, is_superuser=True))
    return client


@pytest.fixture
def rows() -> dict[str, OutboxMessage]:
    pending = outbox.enqueue("t.name", ["pending"], publish_on_commit=False)
    published = outbox.enqueue("t.name", ["published"], publish_on_commit=False)
    failed = outbox.enqueue("t.name", ["failed"], publish_on_commit=False)
    OutboxMessage.objects.filter(pk=published.pk).update(published_at=timezone.now())
    OutboxMessage.objects.filter(pk=failed.pk).update(
        failed_at=timezone.now(),
        attempts=1,
        last_error="celery.exceptions.QueueNotFound: \"Queue 'gone' missing from task_queues\"",
    )
    return {"pending": pending, "published": published, "failed": failed}


def listed(client: Client, **params: Any) -> list[str]:
    response = client.get(URL, params)
    assert response.status_code == 200
    return sorted(m.args[0] for m in response.context["cl"].result_list)


def test_the_status_filter(admin_client_: Client, rows: dict[str, OutboxMessage]) -> None:
    assert listed(admin_client_) == ["failed", "pending", "published"]
    assert listed(admin_client_, status="pending") == ["pending"]
    assert listed(admin_client_, status="published") == ["published"]
    assert listed(admin_client_, status="failed") == ["failed"]
    assert listed(admin_client_, status="unchecked") == ["published"]
    assert listed(admin_client_, status="republished") == []


def test_what_the_reconciler_did_shows(
    admin_client_: Client, rows: dict[str, OutboxMessage]
) -> None:
    OutboxMessage.objects.filter(pk=rows["published"].pk).update(republished=2)
    OutboxMessage.objects.filter(pk=rows["failed"].pk).update(
        last_error="no outcome seen for event 'e-1' of consumer 'orders.tasks.place_order'"
    )
    assert listed(admin_client_, status="republished") == ["published"]
    OutboxMessage.objects.filter(pk=rows["published"].pk).update(reconciled_at=timezone.now())
    assert listed(admin_client_, status="unchecked") == []
    page = admin_client_.get(URL, {"status": "failed"}).content.decode()
    assert "no outcome seen for event" in page


def test_the_changelist_shows_the_failures(
    admin_client_: Client, rows: dict[str, OutboxMessage]
) -> None:
    page = admin_client_.get(URL).content.decode()
    assert "Outbox: 1 pending" in page
    assert "1 failed" in page
    assert "missing from task_queues" in page  # the error, in the list itself


def test_redrive_clears_failed_at_and_is_logged(
    admin_client_: Client, rows: dict[str, OutboxMessage]
) -> None:
    selected = [m.pk for m in rows.values()]
    response = admin_client_.post(
        URL, {"action": "redrive", "_selected_action": selected}, follow=True
    )
    assert response.status_code == 200
    page = response.content.decode()
    assert "Re-drove 1 failed message" in page
    assert "2 selected message(s) were not failed" in page
    failed = OutboxMessage.objects.get(pk=rows["failed"].pk)
    assert failed.failed_at is None  # the relay publishes it next
    assert "QueueNotFound" in failed.last_error  # its history is kept
    assert set(OutboxMessage.objects.pending().values_list("pk", flat=True)) == {
        rows["pending"].pk,
        rows["failed"].pk,
    }
    entry = LogEntry.objects.get()
    assert (entry.object_id, entry.action_flag) == (str(failed.pk), CHANGE)
    assert "Re-driven after: celery.exceptions.QueueNotFound" in entry.get_change_message()


def test_redrive_needs_the_delete_permission(rows: dict[str, OutboxMessage]) -> None:
    staff = UserFactory(username="viewer", is_staff=True)
    staff.user_permissions.add(Permission.objects.get(codename="view_outboxmessage"))
    client = Client()
    client.force_login(staff)
    response = client.get(URL)
    assert response.status_code == 200
    form = response.context["action_form"]  # None when no action is allowed
    assert "redrive" not in ([name for name, _ in form.fields["action"].choices] if form else [])
    client.post(URL, {"action": "redrive", "_selected_action": [rows["failed"].pk]})
    assert OutboxMessage.objects.get(pk=rows["failed"].pk).failed_at is not None


def test_rows_are_read_only(admin_client_: Client, rows: dict[str, OutboxMessage]) -> None:
    assert admin_client_.get(f"{URL}add/").status_code == 403
    response = admin_client_.get(f"{URL}{rows['failed'].pk}/change/")
    assert response.status_code == 200
    assert 'name="_save"' not in response.content.decode()
