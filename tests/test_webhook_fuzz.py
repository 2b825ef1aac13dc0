"""Fuzzing the webhook (hypothesis), through the real FastAPI app and catalog: no request gets a 500,
no answer leaks the secret or a stack trace, and only the exact secret gets past the door."""

from __future__ import annotations

import copy
import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelfactory.testing.env import settings_env

SECRET = "fuzz-webhook-secret-7f3a"
FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "200")), deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
ALLOWED = {200, 400, 401, 413, 422}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=50),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=25,
)
VALID = {
    "event": {"action": "update", "scope": "repo.content"},
    "repo": {"type": "model", "name": "nobody/not-watched", "headSha": "a" * 40},
    "updatedRefs": [{"ref": "refs/heads/main", "oldSha": "b" * 40, "newSha": "a" * 40}],
    "webhook": {"id": "6543", "version": 3},
}
PATHS = [("event",), ("event", "action"), ("event", "scope"), ("repo",), ("repo", "type"), ("repo", "name"),
         ("repo", "headSha"), ("updatedRefs",), ("updatedRefs", 0), ("updatedRefs", 0, "ref"),
         ("updatedRefs", 0, "newSha"), ("webhook",)]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from fastapi.testclient import TestClient

    from modelfactory.interfaces.server import create_app

    with settings_env(MODELFACTORY_WEBHOOK_SECRET=SECRET):  # the module's own catalog (conftest)
        with TestClient(create_app(), raise_server_exceptions=False) as test_client:
            yield test_client


def check(response) -> None:
    assert response.status_code in ALLOWED, (response.status_code, response.text)
    assert SECRET not in response.text
    assert "Traceback" not in response.text and 'File "' not in response.text
    response.json()  # always a JSON answer


def post(client, body: bytes, secret: str = SECRET):
    return client.post("/hooks/huggingface", content=body,
                       headers={"X-Webhook-Secret": secret, "Content-Type": "application/json"})


@FUZZ
@given(st.binary(max_size=2000))
def test_arbitrary_bytes(client, body):
    check(post(client, body))


@FUZZ
@given(json_values)
def test_arbitrary_json(client, value):
    check(post(client, json.dumps(value).encode()))


@FUZZ
@given(st.sampled_from(PATHS), json_values)
def test_one_field_of_a_real_payload_replaced(client, path, value):
    payload = copy.deepcopy(VALID)
    node = payload
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    response = post(client, json.dumps(payload).encode())
    check(response)
    assert response.status_code != 202, "an unwatched repo never starts a build"


#: Header values a client can send: visible ASCII, and raw bytes 0x80-0xff (read as latin-1).
header_values = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=60) | st.binary(
    max_size=60).map(lambda raw: bytes(b for b in raw if b >= 0x80 or 32 <= b < 127))


@FUZZ
@given(header_values | st.sampled_from([SECRET, SECRET + " ", SECRET[:-1], SECRET.upper(), ""]))
def test_only_the_exact_secret_gets_in(client, secret):
    response = post(client, json.dumps(VALID).encode(), secret=secret)
    check(response)
    assert (response.status_code == 401) == (secret != SECRET)


def test_valid_payload_for_an_unwatched_repo_is_ignored(client):
    response = post(client, json.dumps(VALID).encode())
    assert response.status_code == 200 and response.json()["status"] == "ignored"


def test_oversized_body_is_refused_without_reading_it_all(client):
    response = post(client, b'{"pad": "' + b"x" * (1 << 20) + b'"}')
    assert response.status_code == 413
    check(response)


def test_a_watched_commit_without_a_prefect_server_is_refused_before_claiming_it(client, monkeypatch):
    """No PREFECT_API_URL: Prefect would start a throwaway ephemeral server (no deployment, no worker,
    stopped by nobody). The delivery gets 503 instead, nothing is claimed, so a retry after the server
    is configured builds it; and no server process was started."""
    import psutil

    from modelfactory.catalog import open_catalog
    from modelfactory.triggers import build

    repo, sha = "mf-fuzz/watched-lora", "d" * 40
    with open_catalog() as catalog:
        catalog.add_watch(repo=repo, kind="adapter", base="mf-fuzz/base", replace=True)
    monkeypatch.setattr(build, "prefect_api_url", lambda: None)  # this process's harness may have set one
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    payload = copy.deepcopy(VALID)
    payload["repo"]["name"], payload["updatedRefs"][0]["newSha"] = repo, sha
    response = post(client, json.dumps(payload).encode())
    assert response.status_code == 503 and response.json()["status"] == "error", response.text
    assert SECRET not in response.text and "Traceback" not in response.text
    with open_catalog() as catalog:
        assert catalog.list_deliveries(repo=repo) == [] and catalog.get_watch(repo).last_sha is None
    started = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    assert not started, [p.cmdline() for p in started]


def test_decisions_for_well_formed_deliveries(client):
    """The trigger's decision per payload (no HTTP): ignored with a reason, before any build."""
    from modelfactory.triggers import HubWebhookPayload, handle_delivery

    def decide(**changes):
        payload = copy.deepcopy(VALID)
        for path, value in changes.items():
            node = payload
            *parents, last = path.split("__")
            for key in parents:
                node = node[int(key)] if isinstance(node, list) else node[key]
            node[last] = value
        return handle_delivery(payload=HubWebhookPayload.model_validate(payload))

    assert "not a content update" in decide(event__scope="discussion").reason
    assert "dataset repos" in decide(repo__type="dataset").reason
    unwatched = decide()
    assert unwatched.status == "ignored" and "watch list" in unwatched.reason
    assert unwatched.answer() == {"status": "ignored", "reason": unwatched.reason}
