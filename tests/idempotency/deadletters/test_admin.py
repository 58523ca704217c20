"""The dead letters' admin: the re-drive action, once per letter, refused where it cannot help."""

from __future__ import annotations

import pytest
from django.test import Client
from rest_framework.test import APIClient

from idempotency.admin_base import event_url
from idempotency.models import DeadLetter, OutboxMessage
from tests.browser.story import Story, build
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def story(api_client: APIClient) -> Story:
    return build(api_client)


@pytest.fixture
def root() -> Client:
    client = Client()
    client.force_login(UserFactory(username="root", is_staff=True, is_superuser=True))
    return client


def redrive(client: Client, letters: list[DeadLetter]) -> str:
    response = client.post(
        "/admin/idempotency/deadletter/",
        {"action": "redrive", "_selected_action": [letter.pk for letter in letters]},
        follow=True,
    )
    assert response.status_code == 200
    return response.content.decode()


def test_a_dead_letter_is_redriven_once_then_left_alone(story: Story, root: Client) -> None:
    letter = DeadLetter.objects.get(event_id=story.ghost_payment["eventId"])
    before = OutboxMessage.objects.count()
    html = redrive(root, [letter])
    assert "Re-drove 1 dead letter" in html
    assert event_url(letter.event_id) in html
    assert OutboxMessage.objects.count() == before + 1
    html = redrive(root, [letter])
    assert "already re-driven" in html
    assert OutboxMessage.objects.count() == before + 1
    letter.refresh_from_db()
    assert letter.redrive_count == 1


def test_a_mismatch_dead_letter_is_not_redriven_and_the_admin_says_why(
    story: Story, root: Client
) -> None:
    letter = DeadLetter.objects.get(event_id=story.mismatched["eventId"])
    before = OutboxMessage.objects.count()
    html = redrive(root, [letter])
    assert "already processed" in html
    assert "payload mismatch" in html
    assert "forget the inbox record first" in html
    assert "Re-drove" not in html
    assert OutboxMessage.objects.count() == before
    letter.refresh_from_db()
    assert letter.redriven_at is None
