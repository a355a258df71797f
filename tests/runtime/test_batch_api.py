"""The Batch API against a real `piggyback serve`, driven by the official `openai` client: upload, create, poll,
download, cancel, list; and bad input, each refused with a clear error while accepted work goes on."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from openai.types import Batch
from openai.types.chat import ChatCompletion
from prometheus_client.parser import text_string_to_metric_families

from piggyback_runtime import metrics as m
from piggyback_runtime.client import free_port, start_server, wait_ready
from tests.runtime.batch_helpers import TORCH_ATTENTION, batch_config, chat_line, jsonl, parse_jsonl, sqlite_lines

pytestmark = pytest.mark.slow
MAX_FILE_BYTES = 64 * 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    workdir = tmp_path_factory.mktemp("batch-server")
    port = free_port()
    config = batch_config(port, {"directory": str(workdir / "batch"), "max_file_bytes": MAX_FILE_BYTES,
                                 "poll_interval_s": 0.1})  # fmt: skip
    with pytest.MonkeyPatch.context() as env:
        env.setenv(*TORCH_ATTENTION)
        process = start_server(config, workdir, workdir / "server.log")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, process, timeout_s=120)
        yield base, workdir / "batch"
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture
def client(server: tuple[str, Path]) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="unused", max_retries=0, timeout=30)


def wait_for(client: openai.OpenAI, batch_id: str, statuses: tuple[str, ...], timeout_s: float = 60) -> Batch:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if batch.status in statuses:
            return batch
        time.sleep(0.1)
    raise AssertionError(f"batch {batch_id} still {batch.status} after {timeout_s}s")


def submit(client: openai.OpenAI, lines: list[dict], metadata: dict[str, str] | None = None) -> Batch:
    uploaded = client.files.create(file=("input.jsonl", jsonl(lines)), purpose="batch")
    return client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                 completion_window="24h", metadata=metadata)  # fmt: skip


def test_upload_create_poll_download(client: openai.OpenAI, server: tuple[str, Path]) -> None:
    lines = [chat_line(f"req-{i}", max_tokens=3) for i in range(12)]
    uploaded = client.files.create(file=("input.jsonl", jsonl(lines)), purpose="batch")
    assert (uploaded.object, uploaded.purpose, uploaded.bytes, uploaded.filename) == (
        "file", "batch", len(jsonl(lines)), "input.jsonl")
    assert client.files.retrieve(uploaded.id) == uploaded
    assert client.files.content(uploaded.id).content == jsonl(lines)

    created = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                    completion_window="24h", metadata={"job": "nightly"})  # fmt: skip
    assert created.status == "validating" and created.metadata == {"job": "nightly"}
    assert created.expires_at == created.created_at + 24 * 3600
    done = wait_for(client, created.id, ("completed", "failed"))
    assert done.status == "completed", done.errors
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (12, 12, 0)
    assert done.in_progress_at and done.finalizing_at and done.completed_at and done.error_file_id is None
    assert done.created_at <= done.in_progress_at <= done.finalizing_at <= done.completed_at
    # What the client parsed is what the server stored: the same object again, and in the list.
    assert client.batches.retrieve(created.id) == done
    assert done in list(client.batches.list(limit=100))

    assert done.output_file_id is not None
    output_file = client.files.retrieve(done.output_file_id)
    assert output_file.purpose == "batch_output"
    output = parse_jsonl(client.files.content(done.output_file_id).content)
    assert sorted(line["custom_id"] for line in output) == sorted(line["custom_id"] for line in lines)
    for line in output:
        assert line["error"] is None and line["response"]["status_code"] == 200
        completion = ChatCompletion.model_validate(line["response"]["body"])
        assert completion.id == line["response"]["request_id"]
        assert completion.model == "bulk" and completion.usage is not None
        assert completion.usage.completion_tokens <= 3
    rows = sqlite_lines(server[1], done.id)
    assert [(r["state"], r["attempts"], r["finished_attempt"]) for r in rows] == [("completed", 1, 1)] * 12


def test_list_pages_with_after_and_limit(client: openai.OpenAI) -> None:
    ids = [submit(client, [chat_line("a")]).id for _ in range(3)]
    first = client.batches.list(limit=2)
    assert [b.id for b in first.data] == ids[::-1][:2] and first.has_more
    second = client.batches.list(limit=2, after=first.data[-1].id)
    assert second.data[0].id == ids[0]
    every = [b.id for b in client.batches.list(limit=1)]  # the client follows the cursor page by page
    assert every[:3] == ids[::-1] and len(every) == len(set(every))
    for batch_id in ids:
        wait_for(client, batch_id, ("completed",))


def test_cancel_keeps_finished_lines_and_reports_the_rest(client: openai.OpenAI) -> None:
    lines = [chat_line(f"c-{i}", max_tokens=60, ignore_eos=True) for i in range(150)]
    batch = submit(client, lines)
    wait_for(client, batch.id, ("in_progress",))
    time.sleep(0.3)
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at is not None
    done = wait_for(client, batch.id, ("cancelled",))
    assert done.cancelled_at is not None and done.error_file_id is not None
    output = parse_jsonl(client.files.content(done.output_file_id).content) if done.output_file_id else []
    errors = parse_jsonl(client.files.content(done.error_file_id).content)
    assert all(line["response"]["status_code"] == 200 for line in output)
    assert {line["error"]["code"] for line in errors} == {"batch_cancelled"}
    # Every input line exactly once across the two files; the lines that finished stay in the output.
    assert sorted(line["custom_id"] for line in output + errors) == sorted(line["custom_id"] for line in lines)
    assert done.request_counts is not None and done.request_counts.completed == len(output) < len(lines)
    assert client.batches.cancel(done.id) == done  # cancelling a cancelled batch changes nothing


def error_of(call: object) -> openai.APIStatusError:
    try:
        call()  # type: ignore[operator]
    except openai.APIStatusError as exc:
        return exc
    raise AssertionError("the call succeeded")


def test_bad_input_is_refused_clearly_and_accepted_work_goes_on(client: openai.OpenAI) -> None:
    running = submit(client, [chat_line(f"keep-{i}", max_tokens=20, ignore_eos=True) for i in range(40)])

    def upload(content: bytes) -> openai.APIStatusError:
        return error_of(lambda: client.files.create(file=("bad.jsonl", content), purpose="batch"))

    good, bad = jsonl([chat_line("one")]), b'{"custom_id": "two", "method": "POST"\n'
    exc = upload(good + bad)
    assert exc.status_code == 400 and "line 2" in exc.message and "not valid JSON" in exc.message
    exc = upload(jsonl([chat_line("same"), chat_line("other"), chat_line("same")]))
    assert exc.status_code == 400 and "line 3" in exc.message and "repeats line 1" in exc.message
    exc = upload(jsonl([chat_line(f"big-{i}", max_tokens=1) for i in range(MAX_FILE_BYTES // 100)]))
    assert exc.status_code == 413 and "batch.max_file_bytes" in exc.message
    exc = upload(jsonl([chat_line("ls", model="chat")]))
    assert exc.status_code == 400 and "line 1" in exc.message and "LS" in exc.message
    assert exc.body["param"] == "body.model"  # type: ignore[index]
    exc = upload(jsonl([chat_line("ok"), chat_line("nope", model="gpt-4o")]))
    assert exc.status_code == 400 and "line 2" in exc.message and "`gpt-4o` does not exist" in exc.message
    exc = upload(jsonl([chat_line("hot", temperature=7)]))
    assert exc.status_code == 400 and "body.temperature" in exc.message

    uploaded = client.files.create(file=("in.jsonl", jsonl([chat_line("e")])), purpose="batch")
    exc = error_of(lambda: client.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings",
                                                 completion_window="24h"))  # fmt: skip
    assert exc.status_code == 400 and "endpoint" in exc.message and "/v1/chat/completions" in exc.message
    exc = error_of(lambda: client.batches.create(input_file_id="file-missing", endpoint="/v1/chat/completions",
                                                 completion_window="24h"))  # fmt: skip
    assert exc.status_code == 400 and exc.body["param"] == "input_file_id"  # type: ignore[index]
    # Lines whose url is not the batch's endpoint: the batch fails at validation, naming the line.
    mismatched = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/completions",
                                       completion_window="24h")  # fmt: skip
    failed = wait_for(client, mismatched.id, ("failed", "completed"))
    assert failed.status == "failed" and failed.failed_at is not None and failed.errors and failed.errors.data
    assert failed.errors.data[0].line == 1 and failed.errors.data[0].code == "mismatched_endpoint"
    exc = error_of(lambda: client.batches.cancel(failed.id))
    assert exc.status_code == 409 and "failed" in exc.message
    assert error_of(lambda: client.batches.retrieve("batch_nope")).status_code == 404
    finished = wait_for(client, submit(client, [chat_line("x")]).id, ("completed",))
    exc = error_of(lambda: client.batches.cancel(finished.id))
    assert exc.status_code == 409 and "status 'completed'" in exc.message
    assert client.batches.retrieve(finished.id) == finished

    # Nothing accepted was lost: the batch that ran meanwhile has every line.
    done = wait_for(client, running.id, ("completed",))
    assert done.request_counts is not None and done.request_counts.completed == 40
    assert done.output_file_id is not None
    output = parse_jsonl(client.files.content(done.output_file_id).content)
    assert sorted(line["custom_id"] for line in output) == sorted(f"keep-{i}" for i in range(40))


def test_delete_file_and_metrics(client: openai.OpenAI, server: tuple[str, Path]) -> None:
    uploaded = client.files.create(file=("gone.jsonl", jsonl([chat_line("g")])), purpose="batch")
    assert uploaded.id in [f.id for f in client.files.list()]
    deleted = client.files.delete(uploaded.id)
    assert deleted.deleted and deleted.id == uploaded.id
    assert error_of(lambda: client.files.retrieve(uploaded.id)).status_code == 404
    time.sleep(2.5)  # the runner refreshes the progress gauges every 2 s
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{server[0]}/metrics").text)}
    completed = [s.value for s in families[m.BATCHES].samples if s.labels["status"] == "completed"]
    assert completed and completed[0] >= 1
    finished = [s.value for s in families[m.BATCH_LINES_FINISHED].samples
                if s.labels["line_state"] == "completed" and s.name.endswith("_total")]  # fmt: skip
    assert finished and finished[0] >= 12
