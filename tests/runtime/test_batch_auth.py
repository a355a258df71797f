"""API keys on the Batch API, in-process (no model is loaded: the batches stay validating). The same per-service
keys as /v1/completions: a request whose key opens no BE service is a 401 in OpenAI's error envelope on every
/v1/files and /v1/batches route; a file or batch belongs to the services its lines name, and a key that does
not open them all does not see it (404, not listed)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from fastapi.testclient import TestClient

from piggyback_runtime.batch import batch_extension
from piggyback_runtime.server.app import Runtime, create_app
from tests.runtime.batch_helpers import batch_config, chat_line, jsonl

BULK_KEY, BULK2_KEY = "sk-bulk-0123456789", "sk-bulk2-9876543210"
ROUTES = [("POST", "/v1/files"), ("GET", "/v1/files"), ("GET", "/v1/files/file-x"), ("DELETE", "/v1/files/file-x"),
          ("GET", "/v1/files/file-x/content"), ("POST", "/v1/batches"), ("GET", "/v1/batches"),
          ("GET", "/v1/batches/batch_x"), ("POST", "/v1/batches/batch_x/cancel")]  # fmt: skip


@pytest.fixture
def http(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    monkeypatch.setenv("BULK_KEY", BULK_KEY)
    monkeypatch.setenv("BULK2_KEY", BULK2_KEY)
    config = batch_config(8000, {"directory": str(tmp_path / "batch")})
    keyed = {"bulk": "BULK_KEY", "bulk2": "BULK2_KEY"}
    config = config.model_copy(update={"services": [
        s.model_copy(update={"api_key_env": keyed.get(s.name)}) for s in config.services]})  # fmt: skip
    with TestClient(create_app(Runtime(config), [batch_extension])) as client:
        yield client


def openai_client(http: TestClient, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key=key, http_client=http, max_retries=0)


@pytest.mark.parametrize("authorization", [None, "Bearer sk-wrong", f"Basic {BULK_KEY}"])
@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_every_batch_route_without_a_be_key_is_a_401_in_the_openai_envelope(
        http: TestClient, method: str, path: str, authorization: str | None) -> None:  # fmt: skip
    headers = {"authorization": authorization} if authorization else {}
    response = http.request(method, path, headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_api_key")
    assert "Authorization: Bearer" in error["message"]


def test_the_official_client_with_a_key_uploads_creates_lists_and_cancels(http: TestClient) -> None:
    client = openai_client(http, BULK_KEY)
    content = jsonl([chat_line(f"k-{i}") for i in range(3)])
    uploaded = client.files.create(file=("in.jsonl", content), purpose="batch")
    assert client.files.retrieve(uploaded.id) == uploaded
    assert client.files.content(uploaded.id).content == content
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")  # fmt: skip
    assert client.batches.retrieve(batch.id) == batch
    assert [b.id for b in client.batches.list()] == [batch.id]
    assert client.batches.cancel(batch.id).status in ("cancelling", "cancelled")


def test_a_key_sees_only_the_files_and_batches_of_services_it_opens(http: TestClient) -> None:
    bulk, bulk2 = openai_client(http, BULK_KEY), openai_client(http, BULK2_KEY)
    uploaded = bulk.files.create(file=("in.jsonl", jsonl([chat_line("mine")])), purpose="batch")
    batch = bulk.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    with pytest.raises(openai.NotFoundError):
        bulk2.files.retrieve(uploaded.id)
    with pytest.raises(openai.NotFoundError):
        bulk2.files.content(uploaded.id)
    with pytest.raises(openai.NotFoundError):
        bulk2.files.delete(uploaded.id)
    with pytest.raises(openai.NotFoundError):
        bulk2.batches.retrieve(batch.id)
    with pytest.raises(openai.NotFoundError):
        bulk2.batches.cancel(batch.id)
    with pytest.raises(openai.BadRequestError):  # its file is not one bulk2's key may start a batch from
        bulk2.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert list(bulk2.files.list()) == [] and list(bulk2.batches.list()) == []
    assert [f.id for f in bulk.files.list()] == [uploaded.id] and [b.id for b in bulk.batches.list()] == [batch.id]
    # A file whose lines name a service the key does not open is refused at upload, naming the service.
    with pytest.raises(openai.AuthenticationError, match="`bulk`"):
        bulk2.files.create(file=("in.jsonl", jsonl([chat_line("a", model="bulk2"), chat_line("b")])),
                           purpose="batch")  # fmt: skip
    assert bulk.batches.retrieve(batch.id).status == "validating"  # nothing bulk2 did touched it
