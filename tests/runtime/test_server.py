"""The OpenAI-compatible server, as a real process on loopback, driven by the official `openai` client."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from piggyback_runtime import metrics as m
from piggyback_runtime.client import free_port, wait_ready
from piggyback_runtime.config import RuntimeConfig
from piggyback_runtime.server.app import Runtime, create_app
from tests.runtime.configs import runtime_config
from tests.runtime.helpers import LS_SLO
from tests.runtime.test_api_errors import assert_adds_up

pytestmark = pytest.mark.slow  # a real runtime process


def _config(port: int) -> RuntimeConfig:
    return runtime_config(
        model={"max_model_len": 512},
        services=[
            {"name": "chat", "class": "LS", "slo": LS_SLO},
            {"name": "batch", "class": "BE"},
            # No iteration is this fast: every request to it is rejected at arrival.
            {"name": "strict", "class": "LS", "slo": {"ttft_ms": 0.001, "tpot_ms": 0.001}},
        ],
        engine={"block_size": 8, "num_kv_blocks": 128, "max_num_batched_tokens": 64, "max_num_seqs": 64},
        server={"host": "127.0.0.1", "port": port},
    )  # fmt: skip


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    config_path = tmp_path_factory.mktemp("server") / "runtime.yaml"
    config_path.write_text(_config(port).to_yaml())
    log = config_path.with_suffix(".log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "piggyback_runtime.cli", "serve", "--config", str(config_path)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, process, timeout_s=120)
        yield base
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_lists_one_entry_per_hosted_service(client: openai.OpenAI) -> None:
    assert sorted(model.id for model in client.models.list()) == ["batch", "chat", "strict"]


def test_completion_non_streaming(client: openai.OpenAI) -> None:
    result = client.completions.create(
        model="chat", prompt="hello world", max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    assert result.object == "text_completion"
    assert result.choices[0].finish_reason == "length"
    assert result.usage is not None and result.usage.completion_tokens == 12
    assert result.usage.prompt_tokens > 0
    assert isinstance(result.choices[0].text, str)


def test_completion_streaming_concatenates_to_the_non_streaming_text(client: openai.OpenAI) -> None:
    kwargs = {
        "model": "batch",
        "prompt": "the quick brown fox",
        "max_tokens": 16,
        "temperature": 0,
        "extra_body": {"ignore_eos": True},
    }
    whole = client.completions.create(**kwargs).choices[0].text
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 16


def test_chat_completion_streaming_and_not(client: openai.OpenAI) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    whole = client.chat.completions.create(
        model="chat", messages=messages, max_tokens=10, temperature=0, extra_body={"ignore_eos": True}
    )
    assert whole.object == "chat.completion"
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].finish_reason == "length"
    stream = client.chat.completions.create(
        model="chat", messages=messages, max_tokens=10, temperature=0, stream=True, extra_body={"ignore_eos": True}
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_raw_sse_stream_is_framed_as_openai_sends_it(server: str) -> None:
    body = {"model": "chat", "prompt": "hi", "max_tokens": 4, "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert {p["object"] for p in payloads} == {"text_completion"}
    assert len({p["id"] for p in payloads}) == 1


def test_unknown_model_is_a_404_the_client_surfaces(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="no-such-service", prompt="hi", max_tokens=2)
    assert "`no-such-service` does not exist" in str(info.value)
    assert info.value.code == "model_not_found"


def test_malformed_bodies_get_400_naming_the_field(client: openai.OpenAI, server: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="chat", prompt="hi", max_tokens=2, temperature=7)
    assert "temperature" in str(info.value)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="chat", messages=[], max_tokens=2)
    assert "messages" in str(info.value)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="chat", prompt="hi", max_tokens=2, extra_body={"temprature": 0.5})
    assert "temprature" in str(info.value) and "unknown field" in str(info.value)
    response = httpx.post(
        f"{server}/v1/completions", content=b"{not json", timeout=10, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_ls_request_that_cannot_meet_its_slo_is_rejected_with_429_and_retry_after(
    client: openai.OpenAI, server: str
) -> None:
    with pytest.raises(openai.RateLimitError) as info:
        client.completions.create(model="strict", prompt="hello", max_tokens=4)
    assert "TTFTUnattainable" in str(info.value)
    assert int(info.value.response.headers["retry-after"]) >= 1
    assert_adds_up(info.value.message)  # "predicted TTFT T ms = waited W ms + n iterations × I ms", T = W + n·I
    samples = _scrape(server)
    strict = (("class", "LS"), ("model_name", "strict"))
    assert samples[f"{m.REQUESTS}_total"][(*strict, ("outcome", "rejected"))] >= 1
    assert samples[f"{m.SLO_VIOLATIONS}_total"][(("model_name", "strict"), ("type", "rejected"))] >= 1
    assert samples[m.SLO_ATTAINMENT][(("model_name", "strict"),)] == 0.0


def test_per_request_slo_headers_override_the_service_slo(client: openai.OpenAI) -> None:
    with pytest.raises(openai.RateLimitError) as info:
        client.completions.create(model="chat", prompt="hello", max_tokens=4,
                                  extra_headers={"x-slo-ttft-ms": "0.001", "x-slo-tpot-ms": "0.001"})  # fmt: skip
    assert "TTFTUnattainable" in str(info.value)
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model="chat", prompt="hello", max_tokens=4, extra_headers={"x-slo-ttft-ms": "soon"})
    assert "x-slo-ttft-ms" in str(bad.value)
    ok = client.completions.create(model="chat", prompt="hello", max_tokens=2, extra_headers={"x-slo-ttft-ms": "60000"})
    assert ok.choices[0].finish_reason in ("length", "stop")


def test_context_longer_than_the_model_allows_is_rejected(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="chat", prompt=[5] * 500, max_tokens=100)
    assert "maximum context length is 512" in str(info.value)


def _scrape(server: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(httpx.get(f"{server}/metrics", timeout=10).text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def test_metrics_parse_and_hold_every_metric_in_metrics_py(client: openai.OpenAI, server: str) -> None:
    client.completions.create(model="chat", prompt="hi", max_tokens=3, extra_body={"ignore_eos": True})
    text = httpx.get(f"{server}/metrics", timeout=10).text
    families = {f.name for f in text_string_to_metric_families(text)}
    expected = m.metric_family_names()
    assert len(expected) > 20
    assert not set(expected) - families, f"missing from /metrics: {sorted(set(expected) - families)}"
    # The names the rest of the system relies on are spelled once in metrics.py; check a few on the wire.
    assert {m.TTFT_SECONDS, m.NUM_WAITING, m.KV_CACHE_USAGE, m.SLO_ATTAINMENT, m.HOST_KV_USAGE} <= families
    samples = _scrape(server)
    chat = (("class", "LS"), ("model_name", "chat"))
    assert samples[f"{m.TTFT_SECONDS}_count"][chat] >= 1
    assert samples[f"{m.GENERATION_TOKENS}_total"][chat] >= 3


@pytest.mark.parametrize(("service", "service_class"), [("chat", "LS"), ("batch", "BE")], ids=["LS", "BE"])
def test_client_disconnect_mid_stream_frees_its_kv(server: str, service: str, service_class: str) -> None:
    body = {"model": service, "prompt": "stream me", "max_tokens": 400, "temperature": 0, "stream": True,
            "ignore_eos": True}  # fmt: skip
    labels = (("class", service_class), ("model_name", service))

    def kv_used() -> float:
        """The request's KV wherever it is: accelerator KV (LS; BE while hybrid placement keeps it in HBM) or
        host KV (BE on the CPU path)."""
        samples = _scrape(server)
        host = samples[m.HOST_KV_USAGE][()] if service_class == "BE" else 0.0
        return samples[m.KV_CACHE_USAGE].get(labels, 0.0) + host

    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        for _ in range(3):
            next(lines)
        assert kv_used() > 0
    # Connection closed after three events of 400; the request must be gone well before it could finish.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (kv_used() > 0 or _scrape(server)[m.NUM_RUNNING][labels] > 0):
        time.sleep(0.1)
    assert kv_used() == 0
    assert _scrape(server)[f"{m.REQUESTS}_total"][(*labels, ("outcome", "aborted"))] >= 1


def test_readyz_is_not_ready_until_the_model_has_loaded(tmp_path: Path) -> None:
    release = threading.Event()
    runtime = Runtime(_config(8000))
    real_factory = runtime._factory

    def slow_factory():  # type: ignore[no-untyped-def]
        release.wait(30)
        return real_factory()

    runtime._factory = slow_factory
    with TestClient(create_app(runtime)) as http:
        loader = runtime.load_in_background()
        assert http.get("/healthz").status_code == 200
        assert http.get("/readyz").status_code == 503
        response = http.post("/v1/completions", json={"model": "chat", "prompt": "hi"})
        assert response.status_code == 503 and "still loading" in response.json()["error"]["message"]
        release.set()
        loader.join(30)
        assert http.get("/readyz").status_code == 200
        runtime.engine.stop()  # type: ignore[union-attr]
