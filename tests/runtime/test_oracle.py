"""Greedy outputs equal Hugging Face transformers on the same weights (fp32, CPU), token for token.

The one allowed difference is a near-tie: floating-point summation order differs between implementations,
so where the sequences first part the reference's top-two logits must be within NEAR_TIE_TOLERANCE.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from piggyback_runtime.attention import cpu_attention
from piggyback_runtime.engine import Engine
from piggyback_runtime.model.arch import ModelLoadError
from tests.runtime.helpers import (
    assert_matches_reference,
    greedy,
    hf_reference,
    make_request,
    reference_greedy,
    run_to_completion,
    tiny_config,
)

PROMPTS = [[1, *range(10, 10 + n)] for n in (3, 17, 40, 1, 9)]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def llama_engine_and_reference() -> tuple[Engine, torch.nn.Module]:
    engine = Engine(tiny_config())
    return engine, hf_reference(engine.arch, engine.model.state_dict())


@pytest.fixture(scope="module")
def references(llama_engine_and_reference) -> list[tuple[list[int], list[torch.Tensor]]]:
    _, hf = llama_engine_and_reference
    return [reference_greedy(hf, prompt, MAX_TOKENS) for prompt in PROMPTS]


def _serve_all(engine: Engine, classes: list[str]) -> list[list[int]]:
    requests = [
        make_request(f"r{i}", p, greedy(MAX_TOKENS), c) for i, (p, c) in enumerate(zip(PROMPTS, classes, strict=True))
    ]
    for request in requests:
        engine.add_request(request)
    run_to_completion(engine)
    return [r.output_token_ids for r in requests]


@pytest.mark.slow  # seconds: builds and runs a transformers model
@pytest.mark.parametrize("chunked", [True, False], ids=["chunked-prefill", "whole-prefill"])
@pytest.mark.parametrize("decode_attention", ["native", "sdpa"])
def test_batch_of_prompts_matches_transformers(
    chunked: bool, decode_attention: str, llama_engine_and_reference, references, monkeypatch: pytest.MonkeyPatch
) -> None:
    if decode_attention == "sdpa":  # the accelerator path a GPU takes: SDPA over gathered pages
        monkeypatch.setenv(cpu_attention.ENV_BACKEND, "torch")
        monkeypatch.setattr(cpu_attention, "_selected", None)  # chosen again from the changed environment
    base, _ = llama_engine_and_reference
    # Budget 16 splits the 40-token prompt into chunks and mixes prefills with decodes.
    engine = Engine(
        tiny_config(enable_chunked_prefill=chunked, max_num_batched_tokens=16 if chunked else 64), loaded=base.loaded
    )
    outputs = _serve_all(engine, ["LS", "BE", "LS", "BE", "LS"])
    for ours, (ref, logits) in zip(outputs, references, strict=True):
        assert_matches_reference(ours, ref, logits)


def test_requests_arriving_while_others_decode_match_transformers(llama_engine_and_reference, references) -> None:
    base, _ = llama_engine_and_reference
    engine = Engine(tiny_config(max_num_batched_tokens=8), loaded=base.loaded)
    requests = [make_request(f"r{i}", p, greedy(MAX_TOKENS)) for i, p in enumerate(PROMPTS)]
    engine.add_request(requests[0])
    for request in requests[1:]:
        for _ in range(3):  # the earlier ones are decoding when the next arrives
            engine.step()
        assert any(r.in_decode for r in engine.scheduler.running)
        engine.add_request(request)
    run_to_completion(engine)
    for request, (ref, logits) in zip(requests, references, strict=True):
        assert_matches_reference(request.output_token_ids, ref, logits)


def test_preempted_and_recomputed_requests_still_match(llama_engine_and_reference, references) -> None:
    base, _ = llama_engine_and_reference
    # 24 blocks of 4 tokens cannot hold all five requests at full length: the engine must preempt.
    engine = Engine(tiny_config(num_kv_blocks=24), loaded=base.loaded)
    outputs = _serve_all(engine, ["LS", "BE", "BE", "BE", "LS"])
    assert engine.scheduler.num_preemptions > 0
    for ours, (ref, logits) in zip(outputs, references, strict=True):
        assert_matches_reference(ours, ref, logits)


def test_qwen2_with_qkv_bias_and_tied_embeddings_matches_transformers() -> None:
    engine = Engine(tiny_config("synthetic://tiny-qwen2"))
    assert engine.arch.attention_bias and engine.arch.tie_word_embeddings
    hf = hf_reference(engine.arch, engine.model.state_dict())
    prompts = PROMPTS[:3]
    requests = [make_request(f"q{i}", p, greedy(16)) for i, p in enumerate(prompts)]
    for request in requests:
        engine.add_request(request)
    run_to_completion(engine)
    for request, prompt in zip(requests, prompts, strict=True):
        ref, logits = reference_greedy(hf, prompt, 16)
        assert_matches_reference(request.output_token_ids, ref, logits)


def test_safetensors_folder_written_by_transformers_loads_through_file_uri(
    tmp_path: Path, llama_engine_and_reference, references
) -> None:
    base, hf = llama_engine_and_reference
    # Shard it so the index file and several shards are exercised.
    hf.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="200KB")
    base.tokenizer.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "add_bos_token": True,
        "chat_template": base.tokenizer.chat_template,
    }))  # fmt: skip
    assert (tmp_path / "model.safetensors.index.json").exists()
    engine = Engine(tiny_config(f"file://{tmp_path}"))
    assert engine.tokenizer.encode("hello") == base.tokenizer.encode("hello")
    outputs = _serve_all(engine, ["LS"] * len(PROMPTS))
    for ours, (ref, logits) in zip(outputs, references, strict=True):
        assert_matches_reference(ours, ref, logits)

    # A missing shard is named in the error.
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (tmp_path / shard).unlink()
    with pytest.raises(ModelLoadError, match=f"missing: {shard}"):
        Engine(tiny_config(f"file://{tmp_path}"))


def test_near_tie_rule_fails_on_a_real_difference() -> None:
    logits = [torch.tensor([0.0, 5.0, 1.0])]
    with pytest.raises(AssertionError, match="not a near-tie"):
        assert_matches_reference([2], [1], logits)
    assert_matches_reference([2], [1], [torch.tensor([0.0, 5.0, 5.0 - 1e-5])])
