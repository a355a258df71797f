"""The GPU suite: one command that settles, on one GPU, what no CPU run can.

    python benchmarks/gpu_suite.py --quick      # profile, sync, kernels, correctness, throughput: < 4 min (H100)
    python benchmarks/gpu_suite.py              # every section: < 9 min (H100)

Sections, in order, sharing one loaded model (`synthetic://llama-3-8b` in bf16 on a GPU):
- profile: the latency profile the runtime plans with (cached like the runtime's), including the fitted fixed
  per-iteration cost, the per-sampled-row cost, the BE path's per-layer merge cost and the decode cost kind.
- sync: engine steps (LS prefill and decode, BE rows merged from the CPU path) under
  `torch.cuda.set_sync_debug_mode("error")`: any device-to-host synchronisation inside a step fails the suite,
  except the one sanctioned read, `ModelRunner._read_tokens` (the sampled token ids, once per iteration that
  samples), which runs with the debug mode lowered and is counted and named in the table.
- kernels: the Triton paged decode kernel against the padded torch path (gather + SDPA with a mask) and
  against SDPA on a contiguous cache (the fused kernel's best case), each as a share of the measured HBM copy
  bandwidth (KV bytes read per second / bytes read and written per second by a device-to-device copy: 1.0 =
  the kernel reads at the rate a copy moves bytes); the Triton prefill kernel against causal SDPA.
- correctness: the runtime's paged forward (ragged contexts, shuffled block tables, chunked prefill mixed with
  decodes) against Hugging Face `transformers` running the same randomly initialised model (the 8B widths at
  fewer layers; no download) in fp32, bf16 and fp16, logits within stated tolerances (LOGIT_TOLERANCE), and
  the accuracy cost of `engine.kv_cache_dtype: fp8_e4m3` (bf16 over fp8 KV, on GPUs with fp8); greedy tokens of the
  engine identical to transformers' greedy decoding (its KV cache, argmax) over 64 steps in fp32.
- graphs: host kernel launches per decode step and TPOT at batch 1-8, with CUDA graphs and without, LS decodes
  alone and with BE rows merging (piggyback).
- throughput: engine decode throughput against `transformers` generate, same weights, same requests.
- policies: benchmarks/policies.py (LS attainment and BE tokens/s per policy) on the same model.
- interference: benchmarks/interference.py (LS TPOT with and without BE load; the ratio is the product's
  promise: close to 1 on a GPU node).

Results: a markdown table per section and a PNG, under benchmarks/results/gpu/ named by date and device,
rewritten as each section finishes (a run cut off still leaves what it measured). With no CUDA device (or
`--tiny`) the same code runs on synthetic://small-llama with tiny shapes, writes to a temporary directory unless
`--out` says otherwise, and skips only what a CPU cannot do (the CUDA sync debug mode, graph capture); the Triton
kernels then run under the interpreter.

Exit status: 0 when every section measured what it is for; 1 when a section failed (a check did not hold or
it raised); 3 when none failed but one fell back (ran another path than the one it is there to measure, e.g.
the torch attention path on a GPU, or was skipped for a missing dependency). The report's table names the
reason. (2 is argparse's: a bad command line.)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import os
import re
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F

BENCHMARKS = Path(__file__).resolve().parent
RESULTS_GPU = BENCHMARKS / "results" / "gpu"
SECTIONS = ("profile", "sync", "kernels", "correctness", "graphs", "throughput", "policies", "interference")
QUICK_SECTIONS = ("profile", "sync", "kernels", "correctness", "throughput")
EXIT_OK, EXIT_FAILED, EXIT_FALLBACK = 0, 1, 3
LS, BE = "chat", "batch"


@dataclass(frozen=True)
class Scale:
    """Everything that differs between a GPU run and the tiny CPU run."""

    model: str
    dtype: str
    sync_steps: int
    kernel_heads: tuple[int, int, int]  # query heads, kv heads, head dim
    decode_cases: tuple[tuple[int, int], ...]  # (sequences, context tokens)
    prefill_cases: tuple[tuple[int, int], ...]  # (chunk tokens, context tokens after the chunk)
    copy_bytes: int
    kernel_repeats: int
    throughput_batches: tuple[int, ...]
    throughput_prompt: int
    throughput_out: int
    policies: str
    policy_seconds: float
    policy_be_level: int
    interference: dict[str, Any]
    # (Dense row counts, attention grid) of a coarse profile for tiny runs; None: the runtime's own grids.
    profile_grids: tuple[tuple[int, ...], tuple[tuple[int, int, int, int], ...]] | None = None
    # correctness: layers of the reduced model (the loaded model's widths), prompt lengths (ragged), prefill
    # chunk, decode steps after each prompt, greedy steps compared with transformers
    correctness_layers: int = 4
    correctness_prompts: tuple[int, ...] = (700, 33, 1500, 257, 1)
    correctness_chunk: int = 256
    correctness_decodes: int = 6
    greedy_steps: int = 64
    # graphs: decode batch sizes, prompt tokens, decode steps timed
    graph_batches: tuple[int, ...] = (1, 2, 4, 8)
    graph_prompt: int = 128
    graph_steps: int = 32
    graph_be_rows: int = 4  # BE requests decoding on the CPU path in the graphs section's second half
    graph_be_batches: tuple[int, ...] = (1, 2, 4, 8)  # LS batch sizes measured with them


GPU_SCALE = Scale(
    model="synthetic://llama-3-8b", dtype="bfloat16", sync_steps=32, kernel_heads=(32, 8, 128),
    decode_cases=((64, 4096), (16, 16384), (1, 131072)), prefill_cases=((512, 8192), (2048, 2048)),
    copy_bytes=1 << 30, kernel_repeats=20, throughput_batches=(1, 32), throughput_prompt=128, throughput_out=128,
    policies="piggyback,priority", policy_seconds=40.0, policy_be_level=32,
    interference={"ls_requests": 32, "ls_prompt_len": 128, "ls_out": 64, "ls_concurrency": 4, "be_requests": 32,
                  "be_prompt_len": 2048, "be_out": 256, "token_budget": 1024, "cpu_threads": 8, "max_be_rows": 64},
)  # fmt: skip
TINY_SCALE = Scale(
    model="synthetic://small-llama", dtype="float32", sync_steps=6, kernel_heads=(4, 2, 32),
    decode_cases=((3, 40), (1, 70)), prefill_cases=((8, 24),), copy_bytes=8 << 20, kernel_repeats=2,
    throughput_batches=(1, 4), throughput_prompt=8, throughput_out=6, policies="piggyback,priority",
    policy_seconds=2.0, policy_be_level=2,
    interference={"ls_requests": 3, "ls_prompt_len": 8, "ls_out": 4, "ls_concurrency": 2, "be_requests": 2,
                  "be_prompt_len": 16, "be_out": 24, "token_budget": 64, "cpu_threads": 1, "max_be_rows": 8},
    profile_grids=((1, 8, 32, 64), ((8, 128, 0, 0), (0, 0, 64, 0), (4, 64, 32, 32))),
    correctness_layers=2, correctness_prompts=(37, 5, 23, 1), correctness_chunk=8, correctness_decodes=3,
    greedy_steps=24, graph_batches=(1, 3), graph_prompt=8, graph_steps=4, graph_be_rows=2, graph_be_batches=(3,),
)  # fmt: skip
# --quick on a GPU: fewer kernel cases and repeats, shorter throughput runs (the sections are the same).
QUICK_SCALE = dataclasses.replace(
    GPU_SCALE, sync_steps=16, decode_cases=((64, 4096), (1, 32768)), prefill_cases=((2048, 2048),),
    kernel_repeats=8, throughput_out=64, correctness_prompts=(700, 33, 1200, 1),
)  # fmt: skip


@dataclass
class Section:
    name: str
    status: str = "ok"  # ok; failed (a check did not hold); fallback (another path ran); skipped (not run)
    seconds: float = 0.0
    table: list[str] = field(default_factory=list)
    note: str = ""
    figures: dict[str, float] = field(default_factory=dict)  # name -> value, for the plot


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_time(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """The fastest of `repeats` timed runs after one warm-up (seconds)."""
    fn()
    best = math.inf
    for _ in range(repeats):
        _sync(device)
        started = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - started)
    return best


def _engine_config(scale: Scale, device: str, policy: str, num_kv_blocks: int, host_blocks: int) -> Any:
    from piggyback_runtime.config import RuntimeConfig

    return RuntimeConfig.from_dict({
        "model": {"uri": scale.model, "dtype": scale.dtype}, "device": device,
        "services": [{"name": LS, "class": "LS", "slo": {"ttft_ms": 60_000, "tpot_ms": 10_000}},
                     {"name": BE, "class": "BE"}],
        "engine": {"policy": policy, "block_size": 16, "num_kv_blocks": num_kv_blocks, "max_num_seqs": 256,
                   "max_num_batched_tokens": 512},
        "piggyback": {"num_host_kv_blocks": host_blocks, "max_be_requests": 64, "num_cpu_workers": 1,
                      "cpu_threads_per_worker": 1, "max_be_rows_per_layer": 32},
    })  # fmt: skip


# --- sections --------------------------------------------------------------------------------------------------
def section_profile(loaded: Any, scale: Scale, out: Path) -> Section:
    from piggyback_runtime.profiler import fit_table, load_or_profile, profile_key, profile_latency
    from piggyback_runtime.scheduler.latency_model import default_profile_dir, load_or_none

    started = time.perf_counter()
    if scale.profile_grids is not None and load_or_none(None, profile_key(loaded)) is None:
        # Tiny run: a coarse profile, cached where the engines of the later sections look for it.
        rows, grid = scale.profile_grids
        profile_latency(loaded, row_counts=rows, repeats=2, attention_grid=grid, step_rows=(1, 8),
                        be_rows=(1, 8)).save_to_cache(default_profile_dir(), profile_key(loaded))  # fmt: skip
    model = load_or_profile(loaded)
    took = time.perf_counter() - started
    table = fit_table(model)
    mape = sum(e for *_, e in table) / len(table) if table else float("nan")
    a = model.attention
    rows = [
        f"{'what':34} {'value':>14}",
        f"{'dense fit MAPE':34} {mape:>14.1%}",
        f"{'fixed cost per iteration (ms)':34} {model.overhead_s * 1e3:>14.3f}",
        f"{'per sampled row (us)':34} {model.per_sampled_row_s * 1e6:>14.2f}",
        f"{'BE merge, fixed (ms)':34} {model.be_merge_fixed_s * 1e3:>14.3f}",
        f"{'BE merge, per row per layer (us)':34} {model.be_merge_row_s * 1e6:>14.3f}",
        f"{'attention per decode token (ns)':34} {a.per_decode_load * 1e9:>14.3f}",
        f"{'attention per prefill pair (ns)':34} {a.per_prefill_load * 1e9:>14.4f}",
        f"{'decode cost':34} {model.decode_cost:>14}",
    ]
    return Section("profile", table=rows, note=f"profile loaded or measured in {took:.1f} s",
                   figures={"fixed cost ms": model.overhead_s * 1e3})  # fmt: skip


SANCTIONED_READ = "ModelRunner._read_tokens (the sampled token ids, once per iteration that samples)"


def section_sync(loaded: Any, scale: Scale, out: Path) -> Section:
    """Engine steps with LS prefill, LS decode and BE rows on the CPU path, under the CUDA sync debug mode; the
    one sanctioned read runs with the mode lowered, counted."""
    from piggyback_runtime.engine import Engine
    from piggyback_runtime.request import Request, SamplingParams

    device = str(loaded.device)
    engine = Engine(_engine_config(scale, device, "piggyback", 2048, 2048), loaded=loaded)
    params = SamplingParams(max_tokens=4 * scale.sync_steps + 64, temperature=0.0, ignore_eos=True)
    checked = loaded.device.type == "cuda"
    runner = engine.runner
    real_read = runner._read_tokens
    reads = {"calls": 0, "outside": 0}
    in_window = False

    def sanctioned_read(token_ids: torch.Tensor) -> list[int]:
        reads["calls"] += 1
        if checked and in_window:
            torch.cuda.set_sync_debug_mode("default")
        try:
            return real_read(token_ids)
        finally:
            if checked and in_window:
                torch.cuda.set_sync_debug_mode("error")

    runner._read_tokens = sanctioned_read  # type: ignore[method-assign]
    try:
        num_requests = 2 if loaded.device.type == "cpu" else 8
        for i in range(num_requests):
            engine.add_request(Request(f"be{i}", BE, "BE", [1] + [7 + i] * 31, params))
            engine.add_request(Request(f"ls{i}", LS, "LS", [1] + [9 + i] * 15, params))
        pb = engine.piggyback
        for _ in range(400):  # warm up until BE rows decode on the CPU path and LS requests decode
            engine.step()
            if pb is not None and pb.rows and all(r.output_token_ids for r in engine.requests.values()):
                break
        if runner.graphs is not None:  # a capture synchronises: capture every size the window may use first
            runner.graphs.capture_up_to(2 * num_requests + 1, with_merges=pb is not None)
        engine.add_request(Request("ls-late", LS, "LS", [1] + [5] * 40, params))  # a prefill inside the window
        merged_before = engine.metrics.be_rows_merged._sum.get()
        reads["calls"] = 0
        in_window = True
        if checked:
            torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(scale.sync_steps):
                engine.step()
        except RuntimeError as exc:
            return Section("sync", "failed", note=f"a step synchronised with the host outside {SANCTIONED_READ}: "
                           f"{exc}")  # fmt: skip
        finally:
            in_window = False
            if checked:
                torch.cuda.set_sync_debug_mode("default")
        merged = engine.metrics.be_rows_merged._sum.get() - merged_before
    finally:
        runner._read_tokens = real_read  # type: ignore[method-assign]
        engine.close()
    if reads["calls"] > scale.sync_steps:
        return Section("sync", "failed", note=f"{reads['calls']} sampled-token reads in {scale.sync_steps} steps: "
                       "more than one per iteration")  # fmt: skip
    mode = "under torch.cuda sync debug mode 'error'" if checked else "on CPU (no CUDA sync debug mode to check)"
    table = [f"{scale.sync_steps} engine steps {mode}: no synchronisation but the sanctioned read",
             f"sanctioned read: {SANCTIONED_READ}: {reads['calls']} calls",
             f"BE rows merged in them: {merged:.0f}"]  # fmt: skip
    return Section("sync", table=table, note=f"allowed: {SANCTIONED_READ}", figures={"BE rows merged": merged})


def _copy_bandwidth(device: torch.device, num_bytes: int) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second): the ceiling a decode kernel sees."""
    src = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = _best_time(lambda: dst.copy_(src), device, 10)
    return 2 * num_bytes / seconds


def _decode_case(triton_paged: Any, device: torch.device, dtype: torch.dtype, heads: tuple[int, int, int],
                 seqs: int, context: int, repeats: int) -> tuple[float, list[float]]:  # fmt: skip
    """(max error against SDPA, KV bytes read per second by: Triton paged, padded torch, contiguous SDPA)."""
    num_heads, kv_heads, head_dim = heads
    block = 16
    gen = torch.Generator(device=device).manual_seed(seqs * 7919 + context)
    per_seq = -(-context // block)
    shape = (seqs * per_seq, block, kv_heads, head_dim)
    key_cache = torch.randn(shape, generator=gen, device=device).to(dtype)
    value_cache = torch.randn(shape, generator=gen, device=device).to(dtype)
    tables = torch.arange(seqs * per_seq, device=device).view(seqs, per_seq)
    tables32 = tables.to(torch.int32)
    lengths = torch.full((seqs,), context, dtype=torch.int32, device=device)
    q = torch.randn(seqs, num_heads, head_dim, generator=gen, device=device).to(dtype)
    scale = head_dim**-0.5
    mask = (torch.arange(per_seq * block, device=device)[None, :] < lengths[:, None])[:, None, None]
    keys_contig = key_cache.view(seqs, per_seq * block, kv_heads, head_dim)[:, :context].transpose(1, 2).contiguous()
    values_contig = value_cache.view(seqs, per_seq * block, kv_heads, head_dim)[:, :context].transpose(1, 2)
    values_contig = values_contig.contiguous()

    def triton_run() -> torch.Tensor:
        return triton_paged.paged_decode_attention(q, key_cache, value_cache, tables32, lengths, scale, context)

    def padded_run() -> torch.Tensor:  # the torch path: gather every row's blocks, mask, SDPA
        keys = key_cache[tables].flatten(1, 2).transpose(1, 2)
        values = value_cache[tables].flatten(1, 2).transpose(1, 2)
        return F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, attn_mask=mask, scale=scale,
                                              enable_gqa=True).squeeze(2)  # fmt: skip

    def contiguous_run() -> torch.Tensor:  # the fused kernel's best case: a dense cache, no mask
        return F.scaled_dot_product_attention(q.unsqueeze(2), keys_contig, values_contig, scale=scale,
                                              enable_gqa=True).squeeze(2)  # fmt: skip

    error = (triton_run().float() - contiguous_run().float()).abs().max().item()
    kv_bytes = 2 * seqs * context * kv_heads * head_dim * key_cache.element_size()
    rates = [kv_bytes / _best_time(fn, device, repeats) for fn in (triton_run, padded_run, contiguous_run)]
    return error, rates


def _prefill_case(triton_paged: Any, device: torch.device, dtype: torch.dtype, heads: tuple[int, int, int],
                  chunk: int, context: int, repeats: int) -> tuple[float, list[float]]:  # fmt: skip
    """(max error against SDPA, seconds of: the Triton paged prefill, SDPA on contiguous K/V with a mask)."""
    num_heads, kv_heads, head_dim = heads
    block = 16
    gen = torch.Generator(device=device).manual_seed(chunk * 7919 + context)
    per_seq = -(-context // block)
    key_cache = torch.randn(per_seq, block, kv_heads, head_dim, generator=gen, device=device).to(dtype)
    value_cache = torch.randn(per_seq, block, kv_heads, head_dim, generator=gen, device=device).to(dtype)
    q = torch.randn(chunk, num_heads, head_dim, generator=gen, device=device).to(dtype)
    out_rows = torch.empty_like(q)
    tables = torch.arange(per_seq, device=device, dtype=torch.int32).view(1, per_seq)
    starts = torch.zeros(1, dtype=torch.int32, device=device)
    counts = torch.full((1,), chunk, dtype=torch.int32, device=device)
    lengths = torch.full((1,), context, dtype=torch.int32, device=device)
    scale = head_dim**-0.5
    keys = key_cache.view(per_seq * block, kv_heads, head_dim)[:context].transpose(0, 1).contiguous()
    values = value_cache.view(per_seq * block, kv_heads, head_dim)[:context].transpose(0, 1).contiguous()
    query_positions = torch.arange(context - chunk, context, device=device)
    mask = torch.arange(context, device=device)[None, :] <= query_positions[:, None]

    def triton_prefill() -> torch.Tensor:
        return triton_paged.paged_prefill_attention(q, key_cache, value_cache, tables, starts, counts, lengths, scale,
                                                    chunk, out_rows)  # fmt: skip

    def sdpa_prefill() -> torch.Tensor:
        return F.scaled_dot_product_attention(q.transpose(0, 1), keys, values, attn_mask=mask, scale=scale,
                                              enable_gqa=True).transpose(0, 1)  # fmt: skip

    error = (triton_prefill().float() - sdpa_prefill().float()).abs().max().item()
    return error, [_best_time(fn, device, repeats) for fn in (triton_prefill, sdpa_prefill)]


def section_kernels(loaded: Any, scale: Scale, out: Path) -> Section:
    try:
        from piggyback_runtime.attention import triton_paged
    except ImportError as exc:
        return Section("kernels", "skipped", note=f"the Triton kernels are not importable here: {exc}")
    device, dtype = loaded.device, loaded.dtype
    tolerance = 2e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-3
    copy_bw = _copy_bandwidth(device, scale.copy_bytes)
    rows = [f"HBM copy bandwidth: {copy_bw / 1e9:.1f} GB/s (read + write)",
            f"{'decode seqs x ctx':>18} {'triton GB/s':>12} {'share':>6} {'padded torch':>12} {'share':>6} "
            f"{'contig SDPA':>12} {'share':>6} {'max err':>8}"]  # fmt: skip
    figures: dict[str, float] = {}
    failed = []
    for seqs, context in scale.decode_cases:
        error, rates = _decode_case(triton_paged, device, dtype, scale.kernel_heads, seqs, context,
                                    scale.kernel_repeats)  # fmt: skip
        if not error <= tolerance:
            failed.append(f"decode {seqs}x{context}: max error {error:.3g} against SDPA")
        # copy_bw already counts each copied byte twice (read + write), as HBM moves it: a kernel that reads
        # at the rate HBM moves bytes reads copy_bw bytes per second, so its share is rate / copy_bw.
        shares = [rate / copy_bw for rate in rates]
        rows.append(f"{f'{seqs} x {context}':>18} {rates[0] / 1e9:>12.1f} {shares[0]:>6.0%} {rates[1] / 1e9:>12.1f} "
                    f"{shares[1]:>6.0%} {rates[2] / 1e9:>12.1f} {shares[2]:>6.0%} {error:>8.1e}")  # fmt: skip
        figures[f"decode {seqs}x{context} triton"] = shares[0]
        figures[f"decode {seqs}x{context} padded"] = shares[1]
    rows.append(f"{'prefill chunk @ ctx':>18} {'triton ms':>12} {'':>6} {'SDPA ms':>12} {'max err':>8}")
    for chunk, context in scale.prefill_cases:
        error, times = _prefill_case(triton_paged, device, dtype, scale.kernel_heads, chunk, context,
                                     scale.kernel_repeats)  # fmt: skip
        if not error <= tolerance:
            failed.append(f"prefill {chunk}@{context}: max error {error:.3g} against SDPA")
        rows.append(f"{f'{chunk} @ {context}':>18} {times[0] * 1e3:>12.3f} {'':>6} {times[1] * 1e3:>12.3f} "
                    f"{error:>8.1e}")  # fmt: skip
    note = (
        "shares: KV bytes read per second / copy bandwidth (bytes read + written per second; 1.0 = reads "
        "at the rate a copy moves bytes)"
    )
    if device.type == "cpu":
        note += "; on CPU the Triton kernels run under the interpreter: their times mean nothing"
    if failed:
        return Section("kernels", "failed", table=rows, note="; ".join(failed), figures=figures)
    from piggyback_runtime.attention.paged import AttentionKernel, attention_kernel

    in_use = attention_kernel(device, scale.kernel_heads[2], dtype)
    if device.type == "cuda" and in_use is not AttentionKernel.TRITON_PAGED:
        return Section(
            "kernels",
            "fallback",
            table=rows,
            figures=figures,
            note=f"the runtime would attend with {in_use.value}, not the Triton kernels measured here",
        )
    return Section("kernels", table=rows, note=note, figures=figures)


# Logit tolerances of the runtime's paged forward against transformers on the same weights: max |difference| over
# every row's logits, divided by the reference logits' standard deviation. fp32: both exact up to summation order;
# fp16 / bf16: 11 and 8 significant bits through a few layers (the two sides round at different points).
LOGIT_TOLERANCE = {"float32": 1e-3, "float16": 2e-2, "bfloat16": 1e-1}
ARGMAX_AGREEMENT = {"float32": 1.0, "float16": 0.98, "bfloat16": 0.95}  # rows whose top token is the same


def _reduced_model(loaded: Any, layers: int, dtype: torch.dtype) -> Any:
    """The loaded model's widths at `layers` layers, synthetic weights (seed 0, made in fp32, then cast)."""
    from piggyback_runtime.model.llama import LlamaForCausalLM

    arch = dataclasses.replace(loaded.arch, num_hidden_layers=layers)
    with torch.device(loaded.device):
        model = LlamaForCausalLM(arch)
    model.init_synthetic(0)
    model = model.to(dtype).eval()
    return dataclasses.replace(loaded, model=model, arch=arch, dtype=dtype)


def _hf_twin(reduced: Any) -> Any:
    """transformers' model of the same architecture holding the same tensors (every weight must match by name)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = {k: v for k, v in reduced.arch.to_hf_config().items() if k != "architectures"}
    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg), dtype=reduced.dtype).to(reduced.device).eval()
    missing, unexpected = hf.load_state_dict(reduced.model.state_dict(), strict=False)
    tied = {"lm_head.weight"} if reduced.arch.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"transformers' model does not take the runtime's weights: missing {missing}, "
                           f"unexpected {unexpected}")  # fmt: skip
    return hf


@torch.inference_mode()
def _paged_logits_error(reduced: Any, hf: Any, scale: Scale, kv_dtype: torch.dtype | None = None
                        ) -> tuple[float, float, int, int]:  # fmt: skip
    """Ragged prompts through the paged forward in chunks (decodes of finished prompts in the same iterations),
    blocks drawn from a shuffled pool; -> (max |logit diff| / ref std, top-1 agreement, rows, iterations)."""
    from piggyback_runtime.attention.paged import AttentionBatch, paged_attention
    from piggyback_runtime.kv.cache import PagedKVCache

    device, arch, block = reduced.device, reduced.arch, 16
    gen = torch.Generator().manual_seed(11)
    prompts = scale.correctness_prompts
    totals = [p + scale.correctness_decodes for p in prompts]
    sequences = [torch.randint(3, arch.vocab_size, (n,), generator=gen).tolist() for n in totals]
    num_blocks = sum(-(-n // block) for n in totals) + 4
    pool = torch.randperm(num_blocks, generator=gen).tolist()
    tables = []
    for n in totals:
        tables.append(pool[: -(-n // block)])
        pool = pool[-(-n // block) :]
    cache = PagedKVCache(arch, num_blocks, block, kv_dtype or reduced.dtype, device)
    references = [hf(input_ids=torch.tensor([seq], device=device)).logits[0].float() for seq in sequences]
    worst, agree, rows, iterations = 0.0, 0, 0, 0
    done = [0] * len(sequences)
    softmax_scale = arch.head_dim**-0.5
    while any(d < n for d, n in zip(done, totals, strict=True)):
        decodes, prefills, order = [], [], []
        for i, (d, prompt, n) in enumerate(zip(done, prompts, totals, strict=True)):
            if d >= n:
                continue
            if d >= prompt:  # past its prompt: one token a step
                decodes.append((i, d, 1))
            else:
                prefills.append((i, d, min(scale.correctness_chunk, prompt - d)))
        order = decodes + prefills
        batch = AttentionBatch.build([(tables[i], d) for i, d, _ in decodes],
                                     [(tables[i], d, c) for i, d, c in prefills], block, device)  # fmt: skip
        token_ids = [t for i, d, c in order for t in sequences[i][d : d + c]]
        positions = [p for _, d, c in order for p in range(d, d + c)]

        def attention(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      batch: AttentionBatch = batch) -> torch.Tensor:  # fmt: skip
            return paged_attention(layer, q, k, v, cache, batch, softmax_scale)

        hidden = reduced.model.forward_layers(torch.tensor(token_ids, device=device),
                                              torch.tensor(positions, device=device), attention)  # fmt: skip
        logits = reduced.model.compute_logits(hidden)
        expected = torch.cat([references[i][d : d + c] for i, d, c in order])
        spread = expected.std().clamp_min(1e-6)
        worst = max(worst, ((logits - expected).abs().max() / spread).item())
        agree += int((logits.argmax(-1) == expected.argmax(-1)).sum().item())
        rows += len(token_ids)
        iterations += 1
        for i, d, c in order:
            done[i] = d + c
    return worst, agree / rows, rows, iterations


def _greedy_matches(reduced: Any, hf: Any, scale: Scale) -> tuple[int, int]:
    """The engine's greedy tokens against transformers' greedy decoding, fp32; -> (requests identical, requests)."""
    from piggyback_runtime.config import RuntimeConfig
    from piggyback_runtime.engine import Engine
    from piggyback_runtime.request import Request, SamplingParams

    config = RuntimeConfig.from_dict({
        "model": {"uri": scale.model, "dtype": "float32"}, "device": str(reduced.device),
        "services": [{"name": LS, "class": "LS", "slo": {"ttft_ms": 60_000, "tpot_ms": 10_000}}],
        "engine": {"policy": "priority", "block_size": 16, "num_kv_blocks": 512, "max_num_seqs": 8,
                   "max_num_batched_tokens": 256},
        "slo_control": {"enabled": False},
    })  # fmt: skip
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, reduced.arch.vocab_size, (n,), generator=gen).tolist() for n in (9, 40, 3)]
    params = SamplingParams(max_tokens=scale.greedy_steps, temperature=0.0, ignore_eos=True)
    requests = [Request(f"g{i}", LS, "LS", prompt, params) for i, prompt in enumerate(prompts)]
    engine = Engine(config, loaded=reduced)
    try:
        for request in requests:
            engine.add_request(request)
        while engine.has_work():
            engine.step()
    finally:
        engine.close()
    same = 0
    for request, prompt in zip(requests, prompts, strict=True):
        same += int(_hf_greedy(hf, prompt, scale.greedy_steps) == request.output_token_ids)
    return same, len(requests)


@torch.inference_mode()
def _hf_greedy(hf: Any, prompt: list[int], steps: int) -> list[int]:
    """transformers' greedy continuation with its KV cache: argmax of each step's logits. (`generate` with
    min_new_tokens would forbid the EOS token, which the engine's ignore_eos does not: no logits processor.)"""
    device = next(hf.parameters()).device
    out = hf(input_ids=torch.tensor([prompt], device=device), use_cache=True)
    tokens: list[int] = []
    for _ in range(steps):
        token = out.logits[0, -1].argmax()
        tokens.append(int(token))
        out = hf(input_ids=token.view(1, 1), past_key_values=out.past_key_values, use_cache=True)
    return tokens


FP8_KV_TOLERANCE, FP8_KV_AGREEMENT = 3e-1, 0.9  # bf16 model over fp8_e4m3 KV (3 mantissa bits), vs transformers


def _fp8_row(reduced: Any, hf: Any, scale: Scale, bf16_error: float, failed: list[str]) -> str:
    """The accuracy cost of engine.kv_cache_dtype fp8_e4m3: the bf16 model over an fp8 cache against
    transformers in bf16, next to the same with a bf16 cache."""
    from piggyback_runtime.attention.paged import FP8_KV_DTYPE, kv_cache_dtype
    from piggyback_runtime.config import ConfigError

    try:
        kv_cache_dtype("fp8_e4m3", reduced.device, reduced.dtype)
    except ConfigError as exc:
        return f"bf16 + fp8_e4m3 KV: not measured here ({exc})"
    error, agreement, count, iterations = _paged_logits_error(reduced, hf, scale, FP8_KV_DTYPE)
    if not error <= FP8_KV_TOLERANCE or agreement < FP8_KV_AGREEMENT:
        failed.append(f"bf16 + fp8 KV: logits off by {error:.3g} std (tolerance {FP8_KV_TOLERANCE:g}), top-1 "
                      f"agreement {agreement:.1%} (at least {FP8_KV_AGREEMENT:.0%})")  # fmt: skip
    return (f"{'bf16+fp8KV':9} {count:6d} {iterations:6d} {error:19.2e} {FP8_KV_TOLERANCE:10.0e} {agreement:11.1%}"
            f"  (cost over bf16 KV: {error - bf16_error:+.2e} std)")  # fmt: skip


def section_correctness(loaded: Any, scale: Scale, out: Path) -> Section:
    try:
        import transformers  # noqa: F401
    except ImportError as exc:
        return Section("correctness", "skipped", note=f"transformers is not installed: {exc}")
    rows = [f"{'dtype':9} {'rows':>6} {'iters':>6} {'max |dlogit| / std':>19} {'tolerance':>10} {'top-1 same':>11}"]
    failed: list[str] = []
    figures: dict[str, float] = {}
    for name in ("float32", "bfloat16", "float16"):
        dtype = getattr(torch, name)
        reduced = _reduced_model(loaded, scale.correctness_layers, dtype)
        hf = _hf_twin(reduced)
        error, agreement, count, iterations = _paged_logits_error(reduced, hf, scale)
        rows.append(f"{name:9} {count:6d} {iterations:6d} {error:19.2e} {LOGIT_TOLERANCE[name]:10.0e} "
                    f"{agreement:11.1%}")  # fmt: skip
        figures[f"{name} logit err"] = error
        if not error <= LOGIT_TOLERANCE[name] or agreement < ARGMAX_AGREEMENT[name]:
            failed.append(f"{name}: logits off by {error:.3g} std (tolerance {LOGIT_TOLERANCE[name]:g}), top-1 "
                          f"agreement {agreement:.1%} (at least {ARGMAX_AGREEMENT[name]:.0%})")  # fmt: skip
        if name == "bfloat16":
            rows.append(_fp8_row(reduced, hf, scale, error, failed))
        if name == "float32":
            same, total = _greedy_matches(reduced, hf, scale)
            rows.append(f"greedy fp32, {scale.greedy_steps} steps: {same} of {total} requests token-identical to "
                        "transformers (greedy, its KV cache)")  # fmt: skip
            if same != total:
                failed.append(f"greedy fp32: {total - same} of {total} requests differ from transformers")
        del reduced, hf
    note = (
        f"{scale.correctness_layers}-layer model of {scale.model}'s widths, prompts {scale.correctness_prompts} "
        f"in {scale.correctness_chunk}-token chunks + {scale.correctness_decodes} decodes, shuffled blocks"
    )
    if failed:
        return Section("correctness", "failed", table=rows, note="; ".join(failed), figures=figures)
    return Section("correctness", table=rows, note=note, figures=figures)


def _launches_per_step(engine: Any) -> float:
    """Host-side kernel launches (cudaLaunchKernel, cuLaunchKernel, cudaGraphLaunch) in one engine step."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        engine.step()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events()]
    return float(sum(1 for n in names if "LaunchKernel" in n or "GraphLaunch" in n))


def _graphs_run(loaded: Any, scale: Scale, batch: int, setting: str, be_rows: int) -> tuple[float, float, int, float]:
    """`batch` LS requests decoding, with `be_rows` BE requests decoding on the CPU path (policy piggyback) or none
    (priority), under `engine.cuda_graphs: setting`: TPOT (s), launches in one step, steps that ran through the
    graphs, BE rows merged per step."""
    from piggyback_runtime.config import RuntimeConfig
    from piggyback_runtime.engine import Engine
    from piggyback_runtime.request import Request, SamplingParams

    steps = scale.graph_steps
    config = RuntimeConfig.from_dict({
        "model": {"uri": scale.model, "dtype": scale.dtype}, "device": str(loaded.device),
        "services": [{"name": LS, "class": "LS", "slo": {"ttft_ms": 60_000, "tpot_ms": 10_000}},
                     {"name": BE, "class": "BE"}],
        "engine": {"policy": "piggyback" if be_rows else "priority", "block_size": 16,
                   "num_kv_blocks": 64 * (batch + be_rows) + 64, "max_num_batched_tokens": 4096,
                   "max_num_seqs": max(scale.graph_batches + scale.graph_be_batches) + be_rows,
                   "cuda_graphs": setting},
        "piggyback": {"num_host_kv_blocks": 64 * be_rows + 64, "max_be_requests": max(be_rows, 1),
                      "num_cpu_workers": 1, "cpu_threads_per_worker": 2, "max_be_rows_per_layer": max(be_rows, 1)},
        "slo_control": {"enabled": False},
    })  # fmt: skip
    engine = Engine(config, loaded=loaded)
    try:
        # Long enough to decode through the warm-up and the timed steps (BE rows advance about a layer a step).
        params = SamplingParams(max_tokens=4 * steps + 64, temperature=0.0, ignore_eos=True)
        for i in range(be_rows):
            engine.add_request(Request(f"be{i}", BE, "BE", [1] + [7 + i] * (scale.graph_prompt - 1), params))
        for i in range(batch):
            engine.add_request(Request(f"r{i}", LS, "LS", [1] + [5 + i] * (scale.graph_prompt - 1), params))
        pb = engine.piggyback
        for _ in range(10_000):  # prefill, until every BE request decodes on the CPU path
            if all(r.output_token_ids for r in engine.requests.values()) and (pb is None or len(pb.rows) == be_rows):
                break
            engine.step()
        if engine.runner.graphs is not None:  # capture ahead: a capture inside the timed steps would count
            engine.runner.graphs.capture_up_to(batch, with_merges=be_rows > 0)
        engine.step()
        launches = _launches_per_step(engine) if loaded.device.type == "cuda" else float("nan")
        graphs = engine.runner.graphs
        replays_before = graphs.replays if graphs is not None else 0
        merged_before = engine.metrics.be_rows_merged._sum.get()
        _sync(loaded.device)
        started = time.perf_counter()
        for _ in range(steps):
            engine.step()
        _sync(loaded.device)
        tpot = (time.perf_counter() - started) / steps
        graphed = graphs.replays - replays_before if graphs is not None else 0
        merged = (engine.metrics.be_rows_merged._sum.get() - merged_before) / steps
    finally:
        engine.close()
    return tpot, launches, graphed, merged


def section_graphs(loaded: Any, scale: Scale, out: Path) -> Section:
    """TPOT and launches per decode step at small batches, with CUDA graphs (auto) and without (off), LS decodes
    alone and with BE rows merging on the piggyback path (graphs between the merge points, merge layers eager)."""
    cuda = loaded.device.type == "cuda"
    rows = [f"{'batch':>5} {'BE rows':>7} {'merged/step':>11} {'TPOT eager ms':>14} {'TPOT graphs ms':>15} "
            f"{'speed-up':>9} {'launches eager':>15} {'launches graphs':>16}"]  # fmt: skip
    figures: dict[str, float] = {}
    fell_back = []
    for be_rows, batches in ((0, scale.graph_batches), (scale.graph_be_rows, scale.graph_be_batches)):
        for batch in batches:
            eager, eager_launches, _, _ = _graphs_run(loaded, scale, batch, "off", be_rows)
            graphed, graph_launches, graphed_steps, merged = _graphs_run(loaded, scale, batch, "auto", be_rows)
            if cuda and graphed_steps < scale.graph_steps:
                fell_back.append(f"batch {batch}, {be_rows} BE rows: {scale.graph_steps - graphed_steps} of "
                                 f"{scale.graph_steps} decode steps ran eager under cuda_graphs auto")  # fmt: skip
            if be_rows and merged == 0:
                fell_back.append(f"batch {batch}: no BE row merged while {be_rows} BE requests decoded")
            rows.append(f"{batch:5d} {be_rows:7d} {merged:11.1f} {eager * 1e3:14.3f} {graphed * 1e3:15.3f} "
                        f"{eager / graphed:8.2f}x {eager_launches:15.0f} {graph_launches:16.0f}")  # fmt: skip
            figures[f"batch {batch}" + (f" +{be_rows} BE" if be_rows else "")] = eager / graphed
    if fell_back:
        return Section("graphs", "fallback", table=rows, note="; ".join(fell_back), figures=figures)
    if not cuda:
        return Section("graphs", table=rows, figures=figures, note="no CUDA: cuda_graphs auto runs eager on this "
                       "device, both columns are the eager path (tests/runtime/test_cuda_graphs.py checks the "
                       "captured pieces here)")  # fmt: skip
    return Section("graphs", table=rows, figures=figures, note="launches: host-side kernel and graph launches in "
                   "one decode step (profiler); with BE rows the merge layers run eager between graphs")  # fmt: skip


def _import_benchmark(name: str) -> Any:
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    return __import__(name)


def section_throughput(loaded: Any, scale: Scale, out: Path) -> Section:
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError as exc:
        return Section("throughput", "skipped", note=f"transformers is not installed: {exc}")
    from piggyback_runtime.config import RuntimeConfig
    from piggyback_runtime.engine import Engine

    bench = _import_benchmark("engine_throughput")
    device = loaded.device
    hf_config = AutoConfig.for_model(**{k: v for k, v in loaded.arch.to_hf_config().items() if k != "architectures"})
    hf = AutoModelForCausalLM.from_config(hf_config, dtype=loaded.dtype).to(device).eval()
    missing, unexpected = hf.load_state_dict(loaded.model.state_dict(), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        return Section("throughput", "failed", note=f"transformers does not take the weights: missing {missing}, "
                       f"unexpected {unexpected}")  # fmt: skip
    rows = [f"{'batch':>5} {'requests':>8} {'transformers tok/s':>19} {'piggyback tok/s':>16} {'ratio':>7}"]
    figures: dict[str, float] = {}
    base = {"model": {"uri": scale.model, "dtype": scale.dtype}, "device": str(device),
            "services": [{"name": "bench", "class": "BE"}]}  # fmt: skip
    try:
        for batch in scale.throughput_batches:
            requests = bench.workload(max(2, batch), scale.throughput_prompt, False, scale.throughput_out, batch)
            useful = sum(n for _, n in requests)
            blocks = 2 * len(requests) * (scale.throughput_prompt + scale.throughput_out) // 16 + 16
            config = RuntimeConfig.from_dict({**base, "engine": {
                "policy": "priority", "max_num_seqs": batch, "num_kv_blocks": blocks,
                "max_num_batched_tokens": max(512, batch * scale.throughput_prompt)}})  # fmt: skip
            engine = Engine(config, loaded=loaded)
            try:
                bench.run_engine(engine, requests[:1])  # warm-up
                bench.run_hf(hf, requests[:1], 1)
                engine_s = bench.run_engine(engine, requests)
                hf_s = bench.run_hf(hf, requests, batch)
            finally:
                engine.close()
            rows.append(f"{batch:5d} {len(requests):8d} {useful / hf_s:19.1f} {useful / engine_s:16.1f} "
                        f"{hf_s / engine_s:6.2f}x")  # fmt: skip
            figures[f"batch {batch}"] = hf_s / engine_s
    finally:
        del hf
    return Section("throughput", table=rows, note="ratio: piggyback tok/s / transformers tok/s (greedy, equal "
                   "lengths)", figures=figures)  # fmt: skip


def section_policies(loaded: Any, scale: Scale, out: Path) -> Section:
    policies = _import_benchmark("policies")
    gpu = loaded.device.type == "cuda"
    args = SimpleNamespace(
        model=scale.model, ttft_ms=1000.0 if gpu else 2000.0, tpot_ms=100.0 if gpu else 500.0,
        token_budget=1024 if gpu else 64, kv_blocks=4096 if gpu else 512, host_kv_blocks=8192 if gpu else 512,
        cpu_threads=8 if gpu else 1, cpu_workers=1, duration_s=scale.policy_seconds, drain_s=scale.policy_seconds / 2,
    )  # fmt: skip
    lengths = (1.0, 1.0) if gpu else (1 / 64, 1 / 16)
    ls_trace, be_pool = policies.make_trace(0, args.duration_s, 4.0 if gpu else 2.0, 1.0 if gpu else 1 / 32, lengths,
                                            loaded.max_model_len)  # fmt: skip
    rows = [f"{'policy':10} {'BE batch':>8} {'LS offered':>10} {'LS SLO ok':>9} {'BE tok/s':>9}"]
    figures: dict[str, float] = {}
    for name in scale.policies.split(","):
        result = policies.run_policy(name, loaded, ls_trace, be_pool, args, scale.policy_be_level)
        rows.append(f"{name:10} {scale.policy_be_level:8d} {result.ls_offered:10d} {result.both_attained:9.1%} "
                    f"{result.be_tokens_per_s:9.1f}")  # fmt: skip
        figures[f"{name} LS SLO ok"] = result.both_attained
    return Section("policies", table=rows, note=f"LS Poisson over {args.duration_s:.0f} s per policy, SLO TTFT "
                   f"{args.ttft_ms:.0f} ms / TPOT {args.tpot_ms:.0f} ms", figures=figures)  # fmt: skip


def section_interference(loaded: Any, scale: Scale, out: Path) -> Section:
    interference = _import_benchmark("interference")
    args = SimpleNamespace(**scale.interference, model=scale.model, ttft_ms=60_000.0, tpot_ms=10_000.0,
                           no_slo_control=False, seed=0, ls_rate=None, ls_start="be-decode")  # fmt: skip
    device = str(loaded.device)
    ls_prompts = interference.prompts(args.ls_requests, args.ls_prompt_len, seed=0)
    be_prompts = interference.prompts(args.be_requests, args.be_prompt_len, seed=1)
    runs = [("LS only", "piggyback", []), ("LS + BE, piggyback", "piggyback", be_prompts),
            ("LS + BE, priority", "priority", be_prompts)]  # fmt: skip
    offsets = None
    results = []
    for name, policy, be in runs:
        result, offsets = interference.run_one(args, loaded, device, name, policy, ls_prompts, offsets, be)
        if result.failed:
            return Section("interference", "failed", note=f"{name}: {'; '.join(result.failed)}")
        results.append(result)
    alone = results[0].p(results[0].tpot_s, 50)
    rows = [f"{'run':22} {'TPOT p50 ms':>12} {'TPOT p99 ms':>12} {'ratio p50':>10} {'BE tokens':>10}"]
    figures: dict[str, float] = {}
    for result in results:
        p50, p99 = result.p(result.tpot_s, 50), result.p(result.tpot_s, 99)
        rows.append(f"{result.name:22} {p50 * 1e3:12.2f} {p99 * 1e3:12.2f} {p50 / alone:10.2f} "
                    f"{result.be_tokens_window:10d}")  # fmt: skip
        figures[result.name] = p50 / alone
    return Section("interference", table=rows, note="ratio: LS TPOT p50 against LS alone (1.0: BE costs LS "
                   "nothing)", figures=figures)  # fmt: skip


RUNNERS: dict[str, Callable[[Any, Scale, Path], Section]] = {
    "profile": section_profile, "sync": section_sync, "kernels": section_kernels,
    "correctness": section_correctness, "graphs": section_graphs, "throughput": section_throughput,
    "policies": section_policies, "interference": section_interference,
}  # fmt: skip


# --- report ----------------------------------------------------------------------------------------------------
def device_label(device: torch.device) -> str:
    from piggyback_runtime.hardware import describe_device

    return describe_device(str(device))


def exit_status(sections: list[Section]) -> int:
    """1 when a section failed, else 3 when one fell back or was skipped, else 0 (see the module docstring)."""
    if any(s.status == "failed" for s in sections):
        return EXIT_FAILED
    if any(s.status in ("fallback", "skipped") for s in sections):
        return EXIT_FALLBACK
    return EXIT_OK


def write_report(sections: list[Section], out: Path, device: str, scale: Scale, wall_s: float, command: str,
                 pending: list[str] | None = None) -> Path:  # fmt: skip
    """The report so far (rewritten after every section: a run cut off keeps what it measured)."""
    today = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device).strip("-").lower()[:60] or "device"
    stem = f"{today}_{slug}"
    out.mkdir(parents=True, exist_ok=True)
    status = {EXIT_OK: "every section ok", EXIT_FAILED: "FAILED", EXIT_FALLBACK: "FELL BACK"}[exit_status(sections)]
    lines = [f"# GPU suite: {device}, {today}", "",
             f"Command: `{command}`; model {scale.model} ({scale.dtype}); {wall_s:.0f} s in all; {status}"
             f" (exit {exit_status(sections)}).",
             "", "| section | status | seconds | note |", "|---|---|---|---|"]  # fmt: skip
    lines += [f"| {s.name} | {s.status} | {s.seconds:.1f} | {s.note.replace('|', '/')} |" for s in sections]
    lines += [f"| {name} | not run yet | | |" for name in pending or []]
    for s in sections:
        if s.table:
            lines += ["", f"## {s.name}", "", "```", *s.table, "```"]
    lines += ["", f"![suite]({stem}.png)", ""]
    path = out / f"{stem}.md"
    path.write_text("\n".join(lines))
    _plot(sections, out / f"{stem}.png", f"{scale.model} on {device}, {today}")
    return path


def _plot(sections: list[Section], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [s for s in sections if s.figures and s.name in ("kernels", "graphs", "throughput", "policies",
                                                             "interference")]  # fmt: skip
    fig, axes = plt.subplots(1, max(1, len(shown)), figsize=(4.5 * max(1, len(shown)), 4), squeeze=False)
    labels = {"kernels": "share of copy bandwidth", "graphs": "TPOT eager / with graphs",
              "throughput": "piggyback / transformers",
              "policies": "LS SLO attained", "interference": "LS TPOT p50 / LS alone"}  # fmt: skip
    for ax, section in zip(axes[0], shown, strict=False):
        names = list(section.figures)
        ax.bar(range(len(names)), [section.figures[n] for n in names], color="#4c72b0")
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=7)
        ax.set_title(section.name)
        ax.set_ylabel(labels[section.name])
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on small-llama (automatic without CUDA)")
    parser.add_argument("--quick", action="store_true", help=f"sections {','.join(QUICK_SECTIONS)} with fewer "
                        "cases (under 4 minutes on an H100)")  # fmt: skip
    parser.add_argument("--out", help="where the report goes (default: benchmarks/results/gpu/ on a GPU, a "
                        "temporary directory with tiny shapes)")  # fmt: skip
    parser.add_argument("--sections", default=None, help=f"comma-separated subset of {SECTIONS} (default: all, "
                        "or the quick set with --quick)")  # fmt: skip
    args = parser.parse_args(argv)
    default = QUICK_SECTIONS if args.quick else SECTIONS
    chosen = [s for s in args.sections.split(",") if s] if args.sections else list(default)
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    cuda = torch.cuda.is_available()
    if not cuda:  # the Triton kernels run on CPU tensors only interpreted; read when triton is first imported
        os.environ.setdefault("TRITON_INTERPRET", "1")
    tiny = args.tiny or not cuda
    scale = TINY_SCALE if tiny else (QUICK_SCALE if args.quick else GPU_SCALE)
    out = Path(args.out) if args.out else (Path(tempfile.mkdtemp(prefix="gpu-suite-")) if tiny else RESULTS_GPU)
    command = " ".join(["python benchmarks/gpu_suite.py", *(argv if argv is not None else sys.argv[1:])])
    from piggyback_runtime.config import RuntimeConfig
    from piggyback_runtime.model.loader import load_model

    started = time.perf_counter()
    device = "cuda" if cuda else "cpu"
    base = RuntimeConfig.from_dict({"model": {"uri": scale.model, "dtype": scale.dtype}, "device": device,
                                    "services": [{"name": BE, "class": "BE"}]})  # fmt: skip
    loaded = load_model(base.model, device)
    label = device_label(loaded.device)
    print(f"gpu suite: {scale.model} ({scale.dtype}) on {label}; sections {', '.join(chosen)}", flush=True)
    sections: list[Section] = []
    path = write_report(sections, out, label, scale, time.perf_counter() - started, command, pending=chosen)
    for index, name in enumerate(chosen):
        section_started = time.perf_counter()
        try:
            section = RUNNERS[name](loaded, scale, out)
        except Exception as exc:  # one broken section must not hide the others' results
            section = Section(name, "failed", note=f"{type(exc).__name__}: {exc}")
            traceback.print_exc()
        section.seconds = time.perf_counter() - section_started
        sections.append(section)
        print(f"[{section.status}] {name} ({section.seconds:.1f} s) {section.note}", flush=True)
        for line in section.table:
            print("    " + line, flush=True)
        path = write_report(sections, out, label, scale, time.perf_counter() - started, command,
                            pending=chosen[index + 1 :])  # fmt: skip
    print(f"report: {path}", flush=True)
    status = exit_status(sections)
    if status != EXIT_OK:
        reasons = [f"{s.name} {s.status}: {s.note}" for s in sections if s.status != "ok"]
        print(f"exit {status}: " + "; ".join(reasons), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
