from __future__ import annotations

import uuid

import pytest
from django.contrib.admin.models import DELETION, LogEntry
from django.contrib.auth.models import Permission
from django.test import Client

from idempotency.models import ProcessedEvent
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
