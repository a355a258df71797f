"""Shared builders for runtime tests: tiny configs, engines, and the Hugging Face reference model."""

from __future__ import annotations

from typing import Any

import torch

from piggyback_runtime.config import RuntimeConfig
from piggyback_runtime.engine import Engine
from piggyback_runtime.model.arch import ModelArch
from piggyback_runtime.request import Request, SamplingParams
from tests.runtime.configs import LS_SLO as LS_SLO  # re-exported: tests import it from here
from tests.runtime.configs import TINY_MODEL, runtime_config


def tiny_config(
    uri: str = TINY_MODEL,
    piggyback: dict[str, Any] | None = None,
    slo_control: dict[str, Any] | None = None,
    **engine: Any,
) -> RuntimeConfig:
    """Small caches and batches for engine tests. Policy `priority` unless asked: most tests need no CPU
    worker processes."""
    engine = {"block_size": 4, "num_kv_blocks": 256, "max_num_batched_tokens": 64, "policy": "priority", **engine}
    # A small budget runs as few sequences: one decode token of each must fit it (engine.max_num_seqs).
    engine.setdefault("max_num_seqs", engine["max_num_batched_tokens"])
    return runtime_config(
        uri=uri,
        engine=engine,
        # Host KV blocks twice the accelerator's: BE prefill KV crosses block sizes on its way to the host.
        piggyback={"host_block_size": 8, "num_host_kv_blocks": 256, "max_be_requests": 16, **(piggyback or {})},
        slo_control=slo_control or {},
    )


def hf_reference(arch: ModelArch, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = {k: v for k, v in arch.to_hf_config().items() if k != "architectures"}
    hf_config = AutoConfig.for_model(**cfg)
    model = AutoModelForCausalLM.from_config(hf_config, torch_dtype=torch.float32).eval()
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    assert not unexpected, unexpected
    assert set(missing) <= {"lm_head.weight"}, missing
    return model


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def make_request(rid: str, prompt: list[int], params: SamplingParams, service_class: str = "LS") -> Request:
    return Request(rid, "chat" if service_class == "LS" else "batch", service_class, list(prompt), params)  # type: ignore[arg-type]


def run_to_completion(engine: Engine, max_steps: int = 10_000) -> int:
    steps = 0
    while engine.has_work():
        engine.step()
        steps += 1
        assert steps < max_steps, "engine did not finish"
    return steps


def reference_greedy(hf: torch.nn.Module, prompt: list[int], max_tokens: int) -> tuple[list[int], list[torch.Tensor]]:
    """HF greedy continuation and the logits at every generated step (for the near-tie rule)."""
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([prompt]),
            max_new_tokens=max_tokens,
            min_new_tokens=max_tokens,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
            pad_token_id=0,
            eos_token_id=None,
        )
    return out.sequences[0, len(prompt) :].tolist(), [s[0] for s in out.scores]


NEAR_TIE_TOLERANCE = 1e-3


def assert_matches_reference(ours: list[int], ref: list[int], ref_logits: list[torch.Tensor]) -> None:
    """Token-for-token equal, except that they may part at a near-tie of the reference's top two logits."""
    for step, (a, b) in enumerate(zip(ours, ref, strict=True)):
        if a != b:
            top2 = torch.topk(ref_logits[step], 2).values
            gap = float(top2[0] - top2[1])
            assert gap <= NEAR_TIE_TOLERANCE, (
                f"diverged at step {step}: ours {a}, reference {b}, reference top-2 gap {gap:.2e} is not a near-tie"
            )
            return
