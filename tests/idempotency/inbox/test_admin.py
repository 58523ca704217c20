from __future__ import annotations

import re
import uuid
from datetime import timedelta
from typing import Any

import pytest
from django.contrib.admin.models import DELETION, LogEntry
from django.contrib.auth.models import Permission
from django.test import Client, override_settings
from django.utils import timezone

from idempotency.celery import idempotent_task
from idempotency.models import Outcome, ProcessedEvent
from tests.factories import OrderFactory, ProcessedEventFactory, UserFactory

pytestmark = pytest.mark.django_db

URL = "/admin/idempotency/processedevent/"


@pytest.fixture
def admin_client_() -> Client:
    client = Client()
    client.force_login(UserFactory(username="root", is_staff=True, is_superuser=True))
    return client


def test_changelist_search_and_filters(admin_client_: Client) -> None:
    wanted = ProcessedEventFactory(event_id="abc-123")
    ProcessedEventFactory(event_id="other", mismatch_fingerprint="f" * 64)
    response = admin_client_.get(URL, {"q": "abc-123"})
    assert response.status_code == 200
    assert list(response.context["cl"].result_list) == [wanted]
    response = admin_client_.get(URL, {"mismatch": "yes"})
    assert [r.event_id for r in response.context["cl"].result_list] == ["other"]


def test_records_are_read_only(admin_client_: Client) -> None:
    record = ProcessedEventFactory()
    assert admin_client_.get(f"{URL}add/").status_code == 403
    response = admin_client_.post(f"{URL}{record.pk}/change/", {"consumer": "changed"})
    assert response.status_code == 403
    record.refresh_from_db()
    assert record.consumer == "tests.consumer"


def test_the_detail_page_links_the_business_entity(admin_client_: Client) -> None:
    order = OrderFactory(original_event_id=uuid.uuid4())
    record = ProcessedEventFactory(event_id=str(order.original_event_id))
    response = admin_client_.get(f"{URL}{record.pk}/change/")
    assert response.status_code == 200
    assert f"/admin/orders/order/{order.pk}/change/" in response.content.decode()


def test_forget_is_logged(admin_client_: Client) -> None:
    records = [ProcessedEventFactory(), ProcessedEventFactory()]
    response = admin_client_.post(
        URL, {"action": "forget", "_selected_action": [r.pk for r in records]}, follow=True
    )
    assert response.status_code == 200
    assert not ProcessedEvent.objects.exists()
    assert LogEntry.objects.filter(action_flag=DELETION).count() == 2


def test_forget_needs_the_delete_permission() -> None:
    viewer = UserFactory(username="viewer", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_processedevent"))
    client = Client()
    client.force_login(viewer)
    record = ProcessedEventFactory()
    response = client.post(URL, {"action": "forget", "_selected_action": [record.pk]})
    assert response.status_code == 200  # the changelist again, without the action
    assert ProcessedEvent.objects.filter(pk=record.pk).exists()


# --- The operations console ----------------------------------------------------------------------


def test_the_changelist_counts_per_consumer_and_outcome(admin_client_: Client) -> None:
    ProcessedEventFactory(consumer="billing", duplicate_count=3)
    ProcessedEventFactory(consumer="billing", outcome=Outcome.REJECTED, duplicate_count=1)
    ProcessedEventFactory(consumer="billing", mismatch_fingerprint="f" * 64)
    ProcessedEventFactory(consumer="shipping")
    response = admin_client_.get(URL)
    stats = response.context["inbox_stats"]
    assert [
        (r["consumer"], r["total"], r["processed"], r["rejected"], r["mismatches"], r["duplicates"])
        for r in stats["per_consumer"]
    ] == [("billing", 3, 2, 1, 1, 4), ("shipping", 1, 1, 0, 0, 0)]
    assert stats["totals"] == {
        "total": 4,
        "processed": 3,
        "rejected": 1,
        "mismatches": 1,
        "duplicates": 4,
    }
    html = response.content.decode()
    assert 'id="inbox-stats"' in html
    assert '<th scope="row">billing</th>' in html
    assert "all consumers" in html


def test_the_counts_follow_the_changelists_filters(admin_client_: Client) -> None:
    ProcessedEventFactory(consumer="billing")
    ProcessedEventFactory(consumer="shipping")
    response = admin_client_.get(URL, {"consumer": "shipping"})
    assert [r["consumer"] for r in response.context["inbox_stats"]["per_consumer"]] == ["shipping"]


@pytest.mark.parametrize("record_duplicates", [False, True])
def test_the_console_says_whether_duplicates_are_counted(
    admin_client_: Client, record_duplicates: bool
) -> None:
    ProcessedEventFactory()
    with override_settings(IDEMPOTENCY={"RECORD_DUPLICATES": record_duplicates}):
        html = admin_client_.get(URL).content.decode()
    off = "counted only when IDEMPOTENCY['RECORD_DUPLICATES'] is on, and it is off"
    assert (off in html) is not record_duplicates


def test_records_per_day_for_the_last_30_days(admin_client_: Client) -> None:
    now = timezone.now()
    for days_ago in (0, 0, 3, 45):
        ProcessedEventFactory(processed_at=now - timedelta(days=days_ago))
    response = admin_client_.get(URL)
    per_day = response.context["inbox_stats"]["per_day"]
    assert len(per_day) == 30
    assert per_day[-1].day == timezone.localdate()
    counts = {entry.day: (entry.count, entry.percent) for entry in per_day}
    assert counts[timezone.localdate(now)] == (2, 100)
    assert counts[timezone.localdate(now - timedelta(days=3))] == (1, 50)
    assert sum(entry.count for entry in per_day) == 3  # 45 days ago is out of the chart
    html = response.content.decode()
    assert html.count('class="idem-bar"') == 30
    assert 'style="height: 50%"' in html
    assert f'<td>{timezone.localdate(now):%Y-%m-%d}</td><td class="num">2</td>' in html


def test_an_empty_inbox_still_renders(admin_client_: Client) -> None:
    response = admin_client_.get(URL)
    assert response.status_code == 200
    assert "No records." in response.content.decode()


def test_a_mismatch_shows_both_fingerprints(admin_client_: Client) -> None:
    record = ProcessedEventFactory(fingerprint="a" * 64, mismatch_fingerprint="b" * 64)
    html = admin_client_.get(f"{URL}{record.pk}/change/").content.decode()
    assert "a" * 64 in html
    assert "b" * 64 in html
    assert "The payloads are not stored" in html


def test_a_mismatch_with_stored_payloads_shows_a_diff(admin_client_: Client) -> None:
    record = ProcessedEventFactory(
        fingerprint="a" * 64,
        mismatch_fingerprint="b" * 64,
        payload={"eventId": "e-1", "amount": 10, "to": "<x>"},
        mismatch_payload={"eventId": "e-1", "amount": 11, "to": "<x>"},
    )
    html = admin_client_.get(f"{URL}{record.pk}/change/").content.decode()
    assert re.search(r'<del class="idem-diff-removed"[^>]*>-  &quot;amount&quot;: 10,</del>', html)
    assert re.search(r'<ins class="idem-diff-added"[^>]*>\+  &quot;amount&quot;: 11,</ins>', html)
    assert "&quot;&lt;x&gt;&quot;" in html  # escaped
    assert "<x>" not in html


def test_no_diff_without_a_mismatch(admin_client_: Client) -> None:
    record = ProcessedEventFactory(payload={"a": 1})
    html = admin_client_.get(f"{URL}{record.pk}/change/").content.decode()
    assert "idem-diff" not in html


# --- Forget and re-drive -----------------------------------------------------------------------

redriven: list[Any] = []


@idempotent_task
def redrivable(event: dict[str, Any]) -> str:
    redriven.append(event)
    return "done"


@pytest.fixture
def published(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """What re-drives publish, run at once in-process instead of through a broker."""
    calls: list[Any] = []

    def apply_async(args: Any = None, **kwargs: Any) -> Any:
        calls.append(args)
        return redrivable.apply(args=args)

    redriven.clear()
    monkeypatch.setattr(redrivable, "apply_async", apply_async)
    return calls


@pytest.fixture
def stored_payloads(settings: Any) -> None:
    """Forget and re-drive is offered only while payloads are stored."""
    settings.IDEMPOTENCY = {**settings.IDEMPOTENCY, "STORE_PAYLOADS": True}


def test_redrive_is_offered_only_when_payloads_are_stored(
    admin_client_: Client, settings: Any
) -> None:
    ProcessedEventFactory()
    settings.IDEMPOTENCY = {**settings.IDEMPOTENCY, "STORE_PAYLOADS": False}
    html = admin_client_.get(URL).content.decode()
    assert 'value="forget"' in html
    assert 'value="forget_and_redrive"' not in html
    settings.IDEMPOTENCY = {**settings.IDEMPOTENCY, "STORE_PAYLOADS": True}
    assert 'value="forget_and_redrive"' in admin_client_.get(URL).content.decode()


def redrive(client: Client, records: list[ProcessedEvent]) -> Any:
    return client.post(
        URL,
        {"action": "forget_and_redrive", "_selected_action": [r.pk for r in records]},
        follow=True,
    )


@pytest.mark.usefixtures("stored_payloads")
def test_redrive_forgets_then_publishes_after_commit(
    admin_client_: Client,
    published: list[Any],
    django_capture_on_commit_callbacks: Any,
) -> None:
    event = {"eventId": "e-1", "amount": 10}
    record = ProcessedEventFactory(consumer=redrivable.name, event_id="e-1", payload=event)
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        response = redrive(admin_client_, [record])
    assert response.status_code == 200
    assert not ProcessedEvent.objects.filter(pk=record.pk).exists()
    assert published == []  # nothing is published before the commit
    for callback in callbacks:
        callback()
    assert published == [[event]]
    assert redriven == [event]  # processed again...
    again = ProcessedEvent.objects.get(consumer=redrivable.name, event_id="e-1")
    assert again.result == "done"  # ...and recorded again
    entry = LogEntry.objects.get(object_id=str(record.pk))
    assert entry.action_flag == DELETION
    assert entry.get_change_message() == (
        f"Forgotten and re-driven: its stored payload was published again to the Celery task "
        f"{redrivable.name}."
    )
    assert "published when the transaction commits" in response.content.decode()


@pytest.mark.usefixtures("stored_payloads")
def test_records_that_cannot_be_redriven_are_reported_and_left_alone(
    admin_client_: Client, published: list[Any]
) -> None:
    no_payload = ProcessedEventFactory(consumer=redrivable.name)
    no_task = ProcessedEventFactory(consumer="not.a.task", payload={"eventId": "x"})
    response = redrive(admin_client_, [no_payload, no_task])
    html = response.content.decode()
    assert "2 events cannot be re-driven and were left alone" in html
    assert "no stored payload" in html
    assert "no Celery task named not.a.task" in html
    assert ProcessedEvent.objects.count() == 2
    assert not LogEntry.objects.exists()
    assert published == []


@pytest.mark.usefixtures("stored_payloads")
def test_redrive_needs_the_delete_permission(published: list[Any]) -> None:
    viewer = UserFactory(username="viewer", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_processedevent"))
    client = Client()
    client.force_login(viewer)
    record = ProcessedEventFactory(consumer=redrivable.name, payload={"eventId": "e-1"})
    redrive(client, [record])
    assert ProcessedEvent.objects.filter(pk=record.pk).exists()
    assert published == []


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("stored_payloads")
def test_redrive_reports_what_it_published_and_what_failed(
    admin_client_: Client, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    ok = ProcessedEventFactory(consumer=redrivable.name, event_id="ok", payload={"eventId": "ok"})
    bad = ProcessedEventFactory(
        consumer=redrivable.name, event_id="bad", payload={"eventId": "bad"}
    )
    sent: list[Any] = []

    def apply_async(args: Any = None, **kwargs: Any) -> None:
        if args[0]["eventId"] == "bad":
            raise ConnectionError("broker down")
        sent.append(args)

    monkeypatch.setattr(redrivable, "apply_async", apply_async)
    html = redrive(admin_client_, [ok, bad]).content.decode()
    assert sent == [[{"eventId": "ok"}]]
    assert "Forgot and re-drove 1 event." in html
    assert "could not be published" in html
    assert str(bad) in html
    assert '{"eventId": "bad"}' in caplog.text  # the payload is not lost
    assert not ProcessedEvent.objects.exists()
