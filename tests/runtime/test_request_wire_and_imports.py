"""Where migration and the OpenAI bodies live: a request's wire form, the import graph, protocol's bodies."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from piggyback_runtime.request import Request, SamplingParams, SLOTarget
from piggyback_runtime.server.protocol import (
    ChatCompletionResponse,
    CompletionResponse,
    completion_body,
    usage,
)


def test_a_requests_wire_form_survives_json_and_rebases_its_timings_onto_the_new_clock() -> None:
    params = SamplingParams(max_tokens=40, temperature=0.7, top_p=0.9, top_k=5, seed=11, stop=("\n\n",),
                            stop_token_ids=(7,), ignore_eos=True)  # fmt: skip
    request = Request("r1", "chat", "LS", [1, 2, 3], params, slo=SLOTarget(0.5, 0.05), arrival_s=90.0)
    request.output_token_ids = [4, 5]
    request.num_computed_tokens = 4
    request.scheduled_s, request.first_token_s, request.last_token_s = 91.0, 92.0, 99.5
    request.generator = 11
    request.num_preemptions = 2
    request.output_text, request.sent_text_len, request.prefix_offset, request.read_offset = "ab", 1, 0, 2

    wire = json.loads(json.dumps(request.to_wire(num_computed_tokens=4, now_s=100.0)))
    moved = Request.from_wire(wire, now_s=1000.0)

    assert (moved.request_id, moved.service, moved.service_class) == ("r1", "chat", "LS")
    assert moved.params == params and moved.slo == SLOTarget(0.5, 0.05)
    assert (moved.prompt_token_ids, moved.output_token_ids, moved.num_computed_tokens) == ([1, 2, 3], [4, 5], 4)
    assert (moved.generator, moved.num_preemptions) == (11, 2)
    assert (moved.output_text, moved.sent_text_len, moved.prefix_offset, moved.read_offset) == ("ab", 1, 0, 2)
    # Ages are kept, not monotonic readings: 10 s, 9 s, 8 s and 0.5 s before the hand-over.
    assert [moved.arrival_s, moved.scheduled_s, moved.first_token_s, moved.last_token_s] == pytest.approx(
        [990.0, 991.0, 992.0, 999.5]
    )


def test_a_malformed_wire_form_is_a_key_type_or_value_error() -> None:
    wire = Request("r1", "chat", "LS", [1], SamplingParams()).to_wire(num_computed_tokens=0, now_s=0.0)
    del wire["params"]
    with pytest.raises(KeyError):
        Request.from_wire(wire, now_s=0.0)


def _imported_by(module: str) -> set[str]:
    code = f"import sys, {module}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


@pytest.mark.slow  # starts a process (a Python subprocess or the operator)
def test_migration_imports_neither_the_server_nor_the_router() -> None:
    loaded = _imported_by("piggyback_runtime.migration")
    uphill = sorted(m for m in loaded if m.startswith(("piggyback_runtime.server", "piggyback_runtime.router")))
    assert uphill == [], f"migration.py pulls in {uphill}: the engine layer must not import the server"
    assert "fastapi" not in loaded and "httpx" not in loaded


@pytest.mark.slow  # starts a process (a Python subprocess or the operator)
def test_the_router_imports_neither_torch_nor_the_engine() -> None:
    loaded = _imported_by("piggyback_runtime.router.app")
    assert "torch" not in loaded and "piggyback_runtime.engine" not in loaded


@pytest.mark.parametrize("chat", [True, False])
def test_protocols_completion_body_is_what_the_openapi_document_promises(chat: bool) -> None:
    body = completion_body("id-1", chat, 1700000000, "svc", "hello", "length", usage(3, 2))
    model = ChatCompletionResponse if chat else CompletionResponse
    parsed = model.model_validate(body)
    assert parsed.usage.total_tokens == 5
    assert body["object"] == ("chat.completion" if chat else "text_completion")
    assert (body["choices"][0]["message"]["content"] if chat else body["choices"][0]["text"]) == "hello"
