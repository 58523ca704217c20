"""The HTTP ``Idempotency-Key`` decorator, end to end through the DRF test client."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any
from unittest import mock

import pytest
from django.contrib.admin.models import DELETION, LogEntry
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import OperationalError, connection
from django.test import Client, override_settings
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from rest_framework.authtoken.models import Token
from rest_framework.parsers import JSONParser
from rest_framework.test import APIClient

from idempotency import http
from idempotency.exceptions import IdempotencyConfigurationError
from idempotency.fingerprint import fingerprint
from idempotency.http import MAX_KEY_LENGTH, PROBLEM_CONTENT_TYPE, handshake, parse_key
from idempotency.models import IdempotencyKey, KeyState
from orders.models import Customer
from tests.factories import UserFactory
from tests.idempotency.http import http_urls
from tests.outage import Outage, outage_control
from tests.services import in_thread, require_postgres, wait_for

pytestmark = [pytest.mark.django_db, pytest.mark.urls("tests.idempotency.http.http_urls")]


@pytest.fixture(autouse=True)
def _reset_views() -> Iterator[None]:
    http_urls.reset()
    yield
    http_urls.reset()


def client_for(username: str) -> APIClient:
    client = APIClient()
    token = Token.objects.create(user=UserFactory(username=username))
    client.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")
    return client


def post(client: APIClient, body: Any, key: str | None = "key-1", path: str = "/widgets/") -> Any:
    headers = {} if key is None else {"Idempotency-Key": key}
    return client.post(path, body, format="json", headers=headers)


def problem(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.content
    assert response["Content-Type"] == PROBLEM_CONTENT_TYPE
    body: dict[str, Any] = json.loads(response.content)
    assert set(body) == {"type", "title", "status", "detail"}
    assert body["status"] == status
    assert body["type"].startswith("urn:django-idempotency:problem:")
    return body


def marker(owner: str, **fields: Any) -> IdempotencyKey:
    """An "in progress" key record, as a concurrent or dead request leaves it."""
    values: dict[str, Any] = {
        "owner": owner,
        "endpoint": "POST widgets/",
        "key": "key-1",
        "fingerprint": fingerprint(
            {"method": "POST", "path": "/widgets/", "body": {"name": "ann"}}
        ),
        "locked_until": timezone.now() + timedelta(seconds=60),
        **fields,
    }
    return IdempotencyKey.objects.create(**values)


# --- The first request, and its replays --------------------------------------------------


def test_the_first_request_runs_and_its_response_is_stored(
    api_client: APIClient, user: Any
) -> None:
    response = post(api_client, {"name": "ann"})
    assert response.status_code == 201
    assert "Idempotent-Replayed" not in response
    assert response.json()["key"] == "key-1"  # current_scope() inside the view
    record = IdempotencyKey.objects.get()
    assert (record.state, record.response_status) == (KeyState.COMPLETED, 201)
    assert (record.owner, record.endpoint, record.key) == (
        f"user:{user.pk}",
        "POST widgets/",
        "key-1",
    )
    assert json.loads(bytes(record.response_body)) == response.json()
    # The safe headers only: no cookie, no per-exchange trace id.
    assert record.response_headers == {
        "Content-Type": "application/json",
        "Location": response["Location"],
    }


def test_a_retry_replays_the_response_without_running_the_view(api_client: APIClient) -> None:
    first = post(api_client, {"name": "ann"})
    retry = post(api_client, {"name": "ann"})
    assert retry.status_code == 201
    assert retry["Idempotent-Replayed"] == "true"
    assert retry.content == first.content
    assert retry["Location"] == first["Location"]
    assert retry["Content-Type"] == first["Content-Type"]
    assert "X-Trace" not in retry
    assert "session-ish" not in retry.cookies
    assert http_urls.calls == ["POST /widgets/"]
    assert Customer.objects.count() == 1
    assert IdempotencyKey.objects.count() == 1


def test_key_order_and_white_space_in_the_body_do_not_make_a_new_request(
    api_client: APIClient,
) -> None:
    headers = {"Idempotency-Key": "key-1"}
    api_client.post(
        "/widgets/", '{"name": "ann", "x": 1}', content_type="application/json", headers=headers
    )
    retry = api_client.post(
        "/widgets/", '{"x":1,"name":"ann"}', content_type="application/json", headers=headers
    )
    assert retry["Idempotent-Replayed"] == "true"


def test_a_body_with_a_lone_surrogate_is_fingerprinted_not_a_500(
    api_client: APIClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """REST framework's own JSON parser lets a lone "\\ud800" escape through; it has no UTF-8
    form, so hashing the request must not rely on one."""
    monkeypatch.setattr(http_urls.WidgetsView, "parser_classes", [JSONParser])
    headers = {"Idempotency-Key": "surrogate"}

    def send(note: str) -> Any:
        body = '{"name": "ann", "note": "' + note + '"}'
        return api_client.post("/widgets/", body, content_type="application/json", headers=headers)

    assert send("\\ud800").status_code == 201
    assert send("\\ud800")["Idempotent-Replayed"] == "true"
    problem(send("\\udfff"), 422)  # another lone surrogate: another request


def test_a_structured_field_string_is_the_same_key_as_a_bare_token(
    api_client: APIClient,
) -> None:
    post(api_client, {"name": "ann"}, key="abc-123")
    retry = post(api_client, {"name": "ann"}, key='"abc-123"')
    assert retry["Idempotent-Replayed"] == "true"


def test_form_data_and_uploads_are_fingerprinted(api_client: APIClient) -> None:
    def send(content: bytes) -> Any:
        upload = SimpleUploadedFile("a.txt", content, content_type="text/plain")
        return api_client.post(
            "/widgets/",
            {"name": "ann", "file": upload},
            format="multipart",
            headers={"Idempotency-Key": "form"},
        )

    assert send(b"abc").status_code == 201
    assert send(b"abc")["Idempotent-Replayed"] == "true"
    problem(send(b"abcd"), 422)  # another file (its size differs)


def test_a_4xx_is_stored_and_replayed(api_client: APIClient) -> None:
    first = post(api_client, {"name": "ann", "outcome": "invalid"})
    assert first.status_code == 400
    assert first.json() == {"name": ["This name is not allowed."]}
    retry = post(api_client, {"name": "ann", "outcome": "invalid"})
    assert retry.status_code == 400
    assert retry["Idempotent-Replayed"] == "true"
    assert retry.content == first.content
    assert len(http_urls.calls) == 1
    assert IdempotencyKey.objects.get().response_status == 400


# --- Errors ----------------------------------------------------------------------------------


def test_the_same_key_with_another_body_is_a_422(api_client: APIClient) -> None:
    post(api_client, {"name": "ann"})
    body = problem(post(api_client, {"name": "bob"}), 422)
    assert body["type"].endswith(":idempotency-key-reused")
    assert Customer.objects.count() == 1
    assert http_urls.calls == ["POST /widgets/"]


def test_the_same_key_on_another_path_is_a_422(api_client: APIClient) -> None:
    headers = {"Idempotency-Key": "k"}
    api_client.patch("/widgets/1/", {"name": "ann"}, format="json", headers=headers)
    response = api_client.patch("/widgets/2/", {"name": "ann"}, format="json", headers=headers)
    problem(response, 422)  # same route and method: the path is part of the request


def test_a_missing_key_is_a_400_when_required(api_client: APIClient) -> None:
    body = problem(post(api_client, {"name": "ann"}, key=None), 400)
    assert body["type"].endswith(":idempotency-key-missing")
    assert "Idempotency-Key" in body["detail"]
    assert not http_urls.calls
    assert not IdempotencyKey.objects.exists()


def test_without_a_key_an_optional_endpoint_runs_every_time(api_client: APIClient) -> None:
    for name in ("ann", "bob"):
        response = api_client.patch("/widgets/1/", {"name": name}, format="json")
        assert response.status_code == 201
        assert "Idempotent-Replayed" not in response
    assert len(http_urls.calls) == 2
    assert not IdempotencyKey.objects.exists()


@pytest.mark.parametrize(
    "key",
    ["", "   ", '""', "x" * (MAX_KEY_LENGTH + 1), "has space", "tab\tkey", "ключ", "é"],
    ids=["empty", "blank", "empty-string", "too-long", "space", "control", "cyrillic", "latin-1"],
)
def test_a_malformed_key_is_a_400(api_client: APIClient, key: str) -> None:
    headers = {"HTTP_IDEMPOTENCY_KEY": key}  # raw, as a client would send any bytes
    response = api_client.post("/widgets/", {"name": "ann"}, format="json", **headers)
    body = problem(response, 400)
    assert body["type"].endswith(":idempotency-key-invalid")
    assert not http_urls.calls


def test_the_longest_and_oddest_valid_keys_are_accepted(api_client: APIClient) -> None:
    assert post(api_client, {"name": "ann"}, key="x" * MAX_KEY_LENGTH).status_code == 201
    assert post(api_client, {"name": "bob"}, key="!#$%&'*+-.^_`|~{}<>").status_code == 201


def test_parse_key() -> None:
    assert parse_key(None) is None
    assert parse_key("  abc ") == "abc"
    assert parse_key('"a\\"b"') == 'a"b'


def test_a_request_in_flight_is_a_409_with_retry_after(api_client: APIClient, user: Any) -> None:
    marker(f"user:{user.pk}")
    body = problem(response := post(api_client, {"name": "ann"}), 409)
    assert body["type"].endswith(":idempotency-key-in-use")
    assert response["Retry-After"] == "1"  # a fresh marker: its request is about to run
    assert not http_urls.calls


@pytest.fixture
def without_row_locks(monkeypatch: pytest.MonkeyPatch) -> None:
    """As on SQLite, whichever the database: only the lease tells a dead request's marker."""
    monkeypatch.setattr(handshake, "_locks_prove_liveness", lambda using: False)


@pytest.fixture
def with_row_locks(monkeypatch: pytest.MonkeyPatch) -> None:
    """As on PostgreSQL, whichever the database: a live request holds its marker's lock."""
    monkeypatch.setattr(handshake, "_locks_prove_liveness", lambda using: True)


@pytest.mark.usefixtures("without_row_locks")
def test_without_row_locks_an_old_markers_retry_after_is_its_age_within_the_lease(
    api_client: APIClient, user: Any
) -> None:
    now = timezone.now()
    record = marker(f"user:{user.pk}", created_at=now - timedelta(seconds=20))
    response = post(api_client, {"name": "ann"})
    assert 19 <= int(response["Retry-After"]) <= 21
    record.created_at = now - timedelta(minutes=10)
    record.locked_until = now + timedelta(seconds=30)
    record.save()
    response = post(api_client, {"name": "ann"})
    assert 29 <= int(response["Retry-After"]) <= 30


@pytest.mark.usefixtures("with_row_locks")
def test_with_row_locks_an_unheld_marker_past_the_claim_window_is_taken_over_at_once(
    api_client: APIClient, user: Any
) -> None:
    # Younger than the claim window: most likely its request is about to take its lock.
    record = marker(f"user:{user.pk}")
    response = post(api_client, {"name": "ann"})
    problem(response, 409)
    assert response["Retry-After"] == "1"
    # Older, unlocked and in progress: its request ended without releasing it. The lease (still
    # 60 s to go) does not have to run out first.
    record.created_at = timezone.now() - http.CLAIM_WINDOW - timedelta(seconds=1)
    record.save()
    taken = post(api_client, {"name": "ann"})
    assert taken.status_code == 201
    assert http_urls.calls == ["POST /widgets/"]
    assert IdempotencyKey.objects.get().state == KeyState.COMPLETED
    assert post(api_client, {"name": "ann"})["Idempotent-Replayed"] == "true"


def test_a_request_in_flight_with_another_body_is_a_422(api_client: APIClient, user: Any) -> None:
    marker(f"user:{user.pk}")
    problem(post(api_client, {"name": "bob"}), 422)


def test_a_dead_requests_marker_is_taken_over_once_its_lease_ends(
    api_client: APIClient, user: Any
) -> None:
    marker(f"user:{user.pk}", locked_until=timezone.now() - timedelta(seconds=1))
    response = post(api_client, {"name": "ann"})
    assert response.status_code == 201
    record = IdempotencyKey.objects.get()
    assert record.state == KeyState.COMPLETED
    assert post(api_client, {"name": "ann"})["Idempotent-Replayed"] == "true"


@override_settings(IDEMPOTENCY={"HTTP_LEASE": timedelta(seconds=5)})
def test_the_marker_is_committed_before_the_view_with_a_lease_of_http_lease(
    api_client: APIClient,
) -> None:
    seen: list[IdempotencyKey] = []
    http_urls.hooks["inside"] = lambda: seen.append(IdempotencyKey.objects.get())
    post(api_client, {"name": "ann"})
    (during,) = seen
    assert during.state == KeyState.IN_PROGRESS
    assert during.locked_until - during.created_at == pytest.approx(
        timedelta(seconds=5), abs=timedelta(seconds=1)
    )


# --- Failures release the key ----------------------------------------------------------------


def test_a_5xx_is_not_stored_its_writes_roll_back_and_the_key_is_released(
    api_client: APIClient,
) -> None:
    first = post(api_client, {"name": "ann", "outcome": "unavailable"})
    assert first.status_code == 503
    assert not Customer.objects.exists()
    assert not IdempotencyKey.objects.exists()
    # The client may retry with the same key (and the same request).
    retry = post(api_client, {"name": "ann", "outcome": "unavailable"})
    assert retry.status_code == 503
    assert "Idempotent-Replayed" not in retry
    assert len(http_urls.calls) == 2


def test_an_exception_rolls_back_releases_the_key_and_a_retry_runs(
    api_client: APIClient,
) -> None:
    with pytest.raises(http_urls.Failure):
        post(api_client, {"name": "ann", "outcome": "crash"})
    assert not Customer.objects.exists()
    assert not IdempotencyKey.objects.exists()
    api_client.raise_request_exception = False
    assert post(api_client, {"name": "ann", "outcome": "crash"}).status_code == 500
    assert not IdempotencyKey.objects.exists()


def test_a_released_key_can_be_used_for_another_request(api_client: APIClient) -> None:
    post(api_client, {"name": "ann", "outcome": "unavailable"})
    assert post(api_client, {"name": "bob"}).status_code == 201


@pytest.fixture
def atomic_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(connection.settings_dict, "ATOMIC_REQUESTS", True)


@pytest.mark.usefixtures("atomic_requests")
def test_with_atomic_requests_a_response_is_stored_and_replayed(api_client: APIClient) -> None:
    first = post(api_client, {"name": "ann"})
    assert first.status_code == 201
    assert post(api_client, {"name": "ann"})["Idempotent-Replayed"] == "true"
    assert Customer.objects.count() == 1


@pytest.mark.usefixtures("atomic_requests")
def test_with_atomic_requests_an_error_rolled_back_by_drf_is_not_stored(
    api_client: APIClient,
) -> None:
    # REST framework marks the request's transaction for rollback on an exception; the
    # response cannot be recorded in it, so the key is released instead.
    assert post(api_client, {"name": "ann", "outcome": "invalid"}).status_code == 400
    assert not IdempotencyKey.objects.exists()
    assert post(api_client, {"name": "ann"}).status_code == 201


# --- Scope -----------------------------------------------------------------------------------


def test_one_users_key_never_replays_another_users_response(api_client: APIClient) -> None:
    mine = post(api_client, {"name": "ann"})
    mallory = client_for("mallory")
    theirs = post(mallory, {"name": "ann"})  # the same key and the very same request
    assert theirs.status_code == 201
    assert "Idempotent-Replayed" not in theirs
    assert theirs.json()["created"] is False  # the view ran again, for them
    assert len(http_urls.calls) == 2
    # Each one's retries replay their own response.
    assert post(mallory, {"name": "ann"}).content == theirs.content
    assert post(api_client, {"name": "ann"}).content == mine.content
    assert len(http_urls.calls) == 2
    assert IdempotencyKey.objects.values("owner").distinct().count() == 2


def test_the_same_key_on_another_endpoint_is_another_key(api_client: APIClient) -> None:
    assert post(api_client, {"name": "ann"}).status_code == 201
    patched = api_client.patch(
        "/widgets/1/", {"name": "bob"}, format="json", headers={"Idempotency-Key": "key-1"}
    )
    assert patched.status_code == 201
    assert "Idempotent-Replayed" not in patched
    assert sorted(IdempotencyKey.objects.values_list("endpoint", flat=True)) == [
        "PATCH widgets/<int:pk>/",
        "POST widgets/",
    ]


def test_an_anonymous_client_cannot_use_a_key(db: Any) -> None:
    response = post(APIClient(), {"name": "ann"}, path="/anonymous-widgets/")
    assert response.status_code in (401, 403)
    assert not http_urls.calls
    assert not IdempotencyKey.objects.exists()


# --- Settings, retention, admin --------------------------------------------------------------


@pytest.mark.parametrize("lease", [timedelta(0), 60, None])
def test_an_invalid_lease_is_a_configuration_error(api_client: APIClient, lease: Any) -> None:
    with (
        override_settings(IDEMPOTENCY={"HTTP_LEASE": lease}),
        pytest.raises(IdempotencyConfigurationError, match="HTTP_LEASE"),
    ):
        post(api_client, {"name": "ann"})


def keys_created(*ages_in_days: int) -> list[IdempotencyKey]:
    now = timezone.now()
    return [
        IdempotencyKey.objects.create(
            owner="user:1",
            endpoint="POST widgets/",
            key=f"key-{index}",
            fingerprint="f" * 64,
            state=KeyState.COMPLETED,
            created_at=now - timedelta(days=age),
            locked_until=now - timedelta(days=age),
        )
        for index, age in enumerate(ages_in_days)
    ]


def test_expired_and_purge_in_batches() -> None:
    keys = keys_created(40, 35, 31, 20, 31, 1, 45)
    before = timezone.now() - timedelta(days=30)
    assert IdempotencyKey.objects.expired(before).count() == 5
    with CaptureQueriesContext(connection) as queries:
        batches = list(IdempotencyKey.objects.purge_batches(before=before, batch_size=2))
    assert batches == [2, 2, 1]
    deletes = [q["sql"] for q in queries.captured_queries if q["sql"].startswith("DELETE")]
    assert len(deletes) == 3
    assert all("BETWEEN" in sql for sql in deletes)
    assert sorted(IdempotencyKey.objects.values_list("pk", flat=True)) == [keys[3].pk, keys[5].pk]


def test_purge_returns_the_count_and_keeps_what_is_not_expired() -> None:
    keys_created(40, 10)
    before = timezone.now() - timedelta(days=30)
    assert IdempotencyKey.objects.purge(before=before, batch_size=1000) == 1
    assert IdempotencyKey.objects.purge(before=before) == 0
    assert IdempotencyKey.objects.count() == 1


def test_purge_refuses_an_empty_batch() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        IdempotencyKey.objects.purge(before=timezone.now(), batch_size=0)


def test_a_purged_key_runs_its_request_again(api_client: APIClient) -> None:
    post(api_client, {"name": "ann"})
    IdempotencyKey.objects.purge(before=timezone.now() + timedelta(seconds=1))
    Customer.objects.all().delete()
    assert "Idempotent-Replayed" not in post(api_client, {"name": "ann"})
    assert len(http_urls.calls) == 2


ADMIN_URL = "/admin/idempotency/idempotencykey/"


@pytest.fixture
def admin_client_() -> Client:
    client = Client()
    client.force_login(UserFactory(username="root", is_staff=True, is_superuser=True))
    return client


@pytest.mark.urls("project.urls")
def test_the_admin_lists_searches_and_shows_keys_read_only(admin_client_: Client) -> None:
    wanted, other = keys_created(1, 2)
    wanted.response_body = b'{"id": 1}'
    wanted.save()
    response = admin_client_.get(ADMIN_URL, {"q": wanted.key})
    assert response.status_code == 200
    assert list(response.context["cl"].result_list) == [wanted]
    detail = admin_client_.get(f"{ADMIN_URL}{wanted.pk}/change/")
    assert detail.status_code == 200
    assert "{&quot;id&quot;: 1}" in detail.content.decode()
    assert admin_client_.get(f"{ADMIN_URL}add/").status_code == 403
    admin_client_.post(f"{ADMIN_URL}{other.pk}/change/", {"key": "changed"})
    other.refresh_from_db()
    assert other.key != "changed"


@pytest.mark.urls("project.urls")
def test_forgetting_keys_in_the_admin_is_logged(admin_client_: Client) -> None:
    keys = keys_created(1, 2)
    response = admin_client_.post(
        ADMIN_URL, {"action": "forget", "_selected_action": [k.pk for k in keys]}, follow=True
    )
    assert response.status_code == 200
    assert not IdempotencyKey.objects.exists()
    assert LogEntry.objects.filter(action_flag=DELETION).count() == 2


# --- Concurrency on PostgreSQL: real parallel connections ------------------------------------

TIMEOUT = 20


def token_client(user: Any) -> APIClient:
    """A client of its own per thread; the test client is not meant to be shared."""
    client = APIClient()
    token, _ = Token.objects.get_or_create(user=user)
    client.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")
    return client


def backend_exists(pid: int) -> bool:
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", [pid])
        return bool(cursor.fetchone()[0])


@pytest.mark.services
@pytest.mark.django_db(transaction=True)
def test_a_concurrent_retry_gets_a_409_at_once_and_later_the_replay(user: Any) -> None:
    require_postgres()
    entered, release = threading.Event(), threading.Event()

    def hold() -> None:
        if not entered.is_set():  # only the first request pauses, holding the key's row lock
            entered.set()
            assert release.wait(TIMEOUT), "never released"

    http_urls.hooks["inside"] = hold
    responses: dict[str, Any] = {}
    errors: list[BaseException] = []

    def send(name: str) -> Callable[[], None]:
        def run() -> None:
            responses[name] = post(token_client(user), {"name": "ann"})

        return run

    first = in_thread(send("first"), errors)
    assert entered.wait(TIMEOUT), f"the first request never reached the view: {errors}"
    # The marker was committed before the view ran, so other connections see it.
    assert IdempotencyKey.objects.get().state == KeyState.IN_PROGRESS
    second = in_thread(send("second"), errors)
    second.join(TIMEOUT)
    assert not second.is_alive(), "the retry waited for the request in flight"
    assert first.is_alive(), "the first request is still holding its key"
    assert not errors, errors
    body = problem(responses["second"], 409)
    assert body["type"].endswith(":idempotency-key-in-use")
    assert responses["second"]["Retry-After"] == "1"

    release.set()
    first.join(TIMEOUT)
    assert not first.is_alive()
    assert not errors, errors
    assert responses["first"].status_code == 201
    replayed = post(token_client(user), {"name": "ann"})
    assert replayed["Idempotent-Replayed"] == "true"
    assert replayed.content == responses["first"].content
    assert Customer.objects.count() == 1
    assert http_urls.calls == ["POST /widgets/"]


@pytest.mark.services
@pytest.mark.django_db(transaction=True)
def test_a_request_that_died_is_taken_over_without_waiting_for_its_lease(
    user: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_postgres()
    entered, release = threading.Event(), threading.Event()
    backend: list[int] = []

    def hold() -> None:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            backend.append(cursor.fetchone()[0])
        entered.set()
        assert release.wait(TIMEOUT), "never released"

    http_urls.hooks["inside"] = hold
    # A dead process runs no clean-up: nothing releases its key.
    monkeypatch.setattr(handshake, "_release", lambda record, using: None)
    errors: list[BaseException] = []
    responses: list[Any] = []
    first = in_thread(lambda: responses.append(post(token_client(user), {"name": "ann"})), errors)
    assert entered.wait(TIMEOUT), f"the first request never reached the view: {errors}"
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_terminate_backend(%s)", backend)
    wait_for(lambda: not backend_exists(backend[0]), TIMEOUT, "the first request's backend to end")
    release.set()
    first.join(TIMEOUT)
    assert not first.is_alive()
    assert not errors, errors
    # It lost its connection: a 503 the client may retry, not a 500.
    problem(responses[0], 503)
    assert responses[0]["Retry-After"].isdigit()
    monkeypatch.undo()
    http_urls.hooks["inside"] = None

    # Its transaction and row lock died with it; its committed marker did not.
    assert IdempotencyKey.objects.get().state == KeyState.IN_PROGRESS
    assert not Customer.objects.exists()
    # A few seconds later nobody holds the marker's lock: the retry takes the key over, though
    # the lease has most of a minute to go.
    IdempotencyKey.objects.update(created_at=timezone.now() - timedelta(seconds=5))
    assert IdempotencyKey.objects.get().locked_until > timezone.now() + timedelta(seconds=30)
    retried = post(token_client(user), {"name": "ann"})
    assert retried.status_code == 201
    assert "Idempotent-Replayed" not in retried
    assert Customer.objects.count() == 1
    assert IdempotencyKey.objects.get().state == KeyState.COMPLETED


# --- A database outage between the marker's commit and the view's transaction ---------------


def outage_before_the_lock(
    monkeypatch: pytest.MonkeyPatch, outage: Outage, seconds: float
) -> list[float]:
    """The database goes away for *seconds* just after the first marker's commit.

    Returns the monotonic times at which it went away (one entry, once it has).
    """
    lock = handshake._lock
    started: list[float] = []

    def lock_after_an_outage(record: IdempotencyKey, using: str) -> IdempotencyKey | None:
        if not started:
            started.append(time.monotonic())
            outage.begin(seconds)
        return lock(record, using)

    monkeypatch.setattr(handshake, "_lock", lock_after_an_outage)
    return started


@pytest.mark.services
@pytest.mark.django_db(transaction=True)
def test_after_an_outage_longer_than_the_release_a_retry_takes_the_key_over_at_once(
    user: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_postgres()
    with outage_control() as outage:
        started = outage_before_the_lock(monkeypatch, outage, seconds=3)
        first = post(token_client(user), {"name": "ann"})
        # The request could not even lock its marker: a 503 the client may retry, not a 500.
        body = problem(first, 503)
        assert body["type"].endswith(":service-unavailable")
        assert int(first["Retry-After"]) >= 1
        wait_for(lambda: not outage.active, TIMEOUT, "the outage to end")
    monkeypatch.undo()
    # The release was retried for about two seconds, within the outage: the marker is left.
    record = IdempotencyKey.objects.get()
    assert record.state == KeyState.IN_PROGRESS
    assert record.locked_until > timezone.now() + timedelta(seconds=30)  # most of the lease left

    retried = post(token_client(user), {"name": "ann"})
    assert time.monotonic() - started[0] < 10  # not the 60 s lease
    assert retried.status_code == 201, retried.content
    assert "Idempotent-Replayed" not in retried
    assert post(token_client(user), {"name": "ann"})["Idempotent-Replayed"] == "true"
    assert Customer.objects.count() == 1
    assert http_urls.calls == ["POST /widgets/"]


@pytest.mark.services
@pytest.mark.django_db(transaction=True)
def test_after_a_blip_the_release_is_retried_and_the_key_is_free(
    user: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_postgres()
    with outage_control() as outage:
        outage_before_the_lock(monkeypatch, outage, seconds=0.5)
        first = post(token_client(user), {"name": "ann"})
        problem(first, 503)
    monkeypatch.undo()
    # A later attempt of the release, on a new connection, deleted the marker.
    assert not IdempotencyKey.objects.exists()
    retried = post(token_client(user), {"name": "ann"})
    assert retried.status_code == 201
    assert Customer.objects.count() == 1


@pytest.mark.django_db(transaction=True)  # outside a transaction, as a request runs
def test_a_release_that_cannot_be_written_is_retried_then_given_up(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    record = marker("user:x")
    attempts: list[float] = []

    def unavailable(record: IdempotencyKey, using: str) -> None:
        attempts.append(time.monotonic())
        raise OperationalError("the database went away")

    monkeypatch.setattr(handshake, "_lock", unavailable)
    handshake._release(record, "default")
    assert len(attempts) == len(handshake._RELEASE_PAUSES)
    assert attempts[-1] - attempts[0] <= handshake._RELEASE_BUDGET + 0.5
    assert "could not release idempotency key" in caplog.text
    assert IdempotencyKey.objects.filter(pk=record.pk).exists()


@pytest.mark.usefixtures("atomic_requests")
def test_inside_a_transaction_of_the_callers_a_failed_release_is_not_retried(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    attempts: list[float] = []

    def unavailable(record: IdempotencyKey, using: str) -> None:
        attempts.append(time.monotonic())
        raise OperationalError("the database went away")

    monkeypatch.setattr(handshake, "_lock", unavailable)
    handshake._release(marker("user:x"), "default")  # the test's transaction is the caller's
    assert len(attempts) == 1


# --- Owners ----------------------------------------------------------------------------------


def test_an_owner_over_150_characters_is_stored_hashed_and_found_again(
    api_client: APIClient, user: Any
) -> None:
    first = post(api_client, {"name": "ann"}, path="/long-owner-widgets/")
    assert first.status_code == 201
    retry = post(api_client, {"name": "ann"}, path="/long-owner-widgets/")
    assert retry["Idempotent-Replayed"] == "true"
    assert http_urls.calls == ["POST /long-owner-widgets/"]
    owner = http_urls.long_owner(mock.Mock(user=user))
    assert len(owner) > 300
    record = IdempotencyKey.objects.get()
    assert len(record.owner) == 150
    assert record.owner == IdempotencyKey.stored_owner(owner)
    assert record.owner.startswith("tenant:ttt")
    assert IdempotencyKey.objects.for_owner(owner).get() == record
    # Stable and unique: another long owner with the same head is another owner.
    other = owner.replace(f":user:{user.pk}", ":user:other")
    assert IdempotencyKey.stored_owner(other) != record.owner
    assert len(IdempotencyKey.stored_owner(other)) == 150
    assert IdempotencyKey.stored_owner("user:1") == "user:1"


def test_an_owner_function_that_returns_no_string_is_a_configuration_error(
    api_client: APIClient,
) -> None:
    request = mock.Mock()
    with pytest.raises(IdempotencyConfigurationError):
        http.owner_of(request, lambda request: 42)
