"""Profile the latency model on the real device: Dense rows, logits rows, accelerator attention loads, whole
forward steps (the fixed per-iteration cost and per-row sampling cost beyond the modules) and the piggyback
path's extra per-layer work for merged BE rows.

`profile_latency` times the loaded model's own modules (so the profile reflects this model, dtype, device and
kernels) and fits `latency_model.LatencyModel`. `load_or_profile` is what the engine calls at startup: the
cached profile for this (model, dtype, device, architecture, code version) once a short probe of a few forward
steps agrees with it within a stated factor (`judge_cached_profile`), else a fresh one, saved.
`profile_main` is the `piggyback profile --config runtime.yaml [--out PATH]` command.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from piggyback_runtime.attention.paged import AttentionBatch, attention_kernel, paged_attention
from piggyback_runtime.config import SLOControlConfig
from piggyback_runtime.hardware import cpu_model_name
from piggyback_runtime.kv.cache import PagedKVCache, kv_block_bytes
from piggyback_runtime.model.loader import LoadedModel
from piggyback_runtime.request import Request, SamplingParams
from piggyback_runtime.sampling import sample
from piggyback_runtime.scheduler.latency_model import (
    DECODE_COST_PADDED,
    DECODE_COST_SUM,
    IterationShape,
    LatencyModel,
    LinearAttentionModel,
    ProfileKey,
    StaircaseModel,
    arch_hash,
    default_profile_dir,
    fit_nonnegative_line,
    fit_step_overhead,
    load_or_none,
    prefill_chunk_load,
)

log = logging.getLogger(__name__)

# Row grids. GPU: dense where tiles/waves step (every 8 up to 512), sparser up to 2048. CPU: a small grid so
# that synthetic://small-llama profiles in seconds on 2 cores (the CPU profile is smooth; the fit interpolates).
GPU_ROW_COUNTS: tuple[int, ...] = (1, *range(8, 513, 8), *range(576, 1025, 64), *range(1152, 2049, 128))
CPU_ROW_COUNTS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 96, 128, 192, 256, 384, 512)
# Attention grids: (decode requests, decode context length, prefill chunk tokens, prefill chunk start).
GPU_ATTENTION_GRID: tuple[tuple[int, int, int, int], ...] = tuple(
    [(n, c, 0, 0) for n in (1, 8, 32, 128, 256) for c in (256, 1024, 4096)]
    + [(0, 0, q, s) for q in (64, 256, 512, 1024, 2048) for s in (0, 1024, 4096)]
    + [(32, 1024, 512, 0), (128, 1024, 256, 1024), (256, 2048, 512, 2048)]
)
CPU_ATTENTION_GRID: tuple[tuple[int, int, int, int], ...] = tuple(
    [(n, c, 0, 0) for n in (1, 8, 32) for c in (128, 512)]
    + [(0, 0, q, s) for q in (32, 128, 256) for s in (0, 256)]
    + [(8, 256, 128, 0), (32, 512, 64, 256)]
)
# Whole forward steps: decoding rows (each sampling a token) at one context length.
GPU_STEP_ROWS: tuple[int, ...] = (1, 8, 32, 64, 128, 256)
CPU_STEP_ROWS: tuple[int, ...] = (1, 8, 32)
GPU_STEP_CONTEXT, CPU_STEP_CONTEXT = 1024, 64
# BE rows merged per layer (the piggyback path's copies out and back), next to this many LS rows.
GPU_BE_ROWS: tuple[int, ...] = (1, 8, 32, 64, 128, 256)
CPU_BE_ROWS: tuple[int, ...] = (1, 8, 32)
_BE_BASE_ROWS = 8
# KV memory the attention profile may use; beyond it decodes share blocks (wrapping around).
_GPU_KV_BYTES = 4 << 30
_CPU_KV_BYTES = 256 << 20
_BLOCK_SIZE = 16


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device, repeats: int) -> list[float]:
    times: list[float] = []
    for _ in range(repeats):
        _sync(device)
        started = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - started)
    return times


def device_name(device: torch.device) -> str:
    """What the profile is valid for: the GPU model, or the CPU model and the threads torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu {cpu_model_name()} x{torch.get_num_threads()} threads"


def profile_key(loaded: LoadedModel) -> ProfileKey:
    return ProfileKey(
        model_uri=loaded.uri,
        dtype=str(loaded.dtype).removeprefix("torch."),
        device_name=device_name(loaded.device),
        arch_hash=arch_hash(dataclasses.asdict(loaded.arch)),
    )


@torch.inference_mode()
def _profile_dense(
    loaded: LoadedModel, device: torch.device, row_counts: Sequence[int], repeats: int
) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """(rows, seconds) samples of pre_attention + post_attention over all layers, and of norm + lm_head."""
    model, arch = loaded.model, loaded.arch
    largest = max(row_counts)
    gen = torch.Generator(device=device).manual_seed(0)
    hidden_all = torch.randn(largest, arch.hidden_size, generator=gen, device=device).to(loaded.dtype)
    cos_all, sin_all = model.rope(torch.arange(largest, device=device), loaded.dtype)

    def dense(rows: int) -> Callable[[], object]:
        hidden0, cos, sin = hidden_all[:rows], cos_all[:rows], sin_all[:rows]

        def run() -> object:
            hidden = hidden0
            for layer in model.layers:
                q, _, _ = layer.pre_attention(hidden, cos, sin)
                hidden = layer.post_attention(q, hidden)  # q has the attention output's shape
            return hidden

        return run

    def logits(rows: int) -> Callable[[], object]:
        return lambda: model.compute_logits(hidden_all[:rows])

    for _ in range(2):  # warm up kernels, allocator and caches at the largest size
        dense(largest)()
        logits(largest)()
    # Repeats are passes over the whole grid in shuffled order, not back-to-back runs of one point: a burst of
    # foreign load (shared cores, clock changes) then spoils one sample of many points, not every sample of one.
    order = list(row_counts)
    rng = random.Random(0)
    dense_samples: list[tuple[float, float]] = []
    logit_samples: list[tuple[float, float]] = []
    for _ in range(repeats):
        rng.shuffle(order)
        for rows in order:
            dense_samples += [(rows, t) for t in _timed(dense(rows), device, 1)]
            logit_samples += [(rows, t) for t in _timed(logits(rows), device, 1)]
    return dense_samples, logit_samples


@torch.inference_mode()
def _profile_attention(
    loaded: LoadedModel, device: torch.device, grid: Sequence[tuple[int, int, int, int]], repeats: int
) -> list[tuple[float, float, float]]:
    """(prefill load, decode load, seconds) samples of paged_attention over all layers."""
    arch = loaded.arch
    tokens_needed = max(n * c + s + q for n, c, q, s in grid)
    cap = _GPU_KV_BYTES if device.type == "cuda" else _CPU_KV_BYTES
    num_blocks = max(
        8, min(-(-tokens_needed // _BLOCK_SIZE) + 1, cap // kv_block_bytes(arch, _BLOCK_SIZE, loaded.dtype))
    )
    cache = PagedKVCache(arch, num_blocks, _BLOCK_SIZE, loaded.dtype, device)
    scale = arch.head_dim**-0.5
    gen = torch.Generator(device=device).manual_seed(1)
    next_block = 0

    def blocks(count: int) -> list[int]:
        nonlocal next_block
        ids = [(next_block + i) % num_blocks for i in range(count)]
        next_block = (next_block + count) % num_blocks
        return ids

    def case(n: int, context: int, q_tokens: int, start: int) -> tuple[Callable[[], object], float, float]:
        decodes = [(blocks(-(-context // _BLOCK_SIZE)), context - 1) for _ in range(n)]
        prefills = [(blocks(-(-(start + q_tokens) // _BLOCK_SIZE)), start, q_tokens)] if q_tokens else []
        batch = AttentionBatch.build(decodes, prefills, _BLOCK_SIZE, device)
        rows = n + q_tokens
        q = torch.randn(rows, arch.num_attention_heads, arch.head_dim, generator=gen, device=device).to(loaded.dtype)
        kv = torch.randn(rows, arch.num_key_value_heads, arch.head_dim, generator=gen, device=device)
        kv = kv.to(loaded.dtype)

        def run() -> object:
            for layer in range(arch.num_hidden_layers):
                paged_attention(layer, q, kv, kv, cache, batch, scale)
            return None

        return run, prefill_chunk_load(start, q_tokens) if q_tokens else 0.0, float(n * context)

    cases = [case(*point) for point in grid]
    cases[-1][0]()  # warm up
    cases[0][0]()
    samples: list[tuple[float, float, float]] = []
    rng = random.Random(1)
    for _ in range(repeats):  # passes over the grid, as for Dense
        rng.shuffle(cases)
        for run, prefill_load, decode_load in cases:
            samples += [(prefill_load, decode_load, t) for t in _timed(run, device, 1)]
    return samples


def decode_cost_in_use(loaded: LoadedModel, device: torch.device | None = None) -> str:
    """How the decode attention `paged_attention` runs for this model costs (the kernel it dispatches to):
    DECODE_COST_SUM for a paged kernel that reads each decode's own context, DECODE_COST_PADDED for the padded
    torch batch (every row gathers and attends over the longest context)."""
    kernel = attention_kernel(device or loaded.device, loaded.arch.head_dim)
    return DECODE_COST_SUM if kernel.decode_cost_is_sum_of_contexts else DECODE_COST_PADDED


class _DecodeSteps:
    """Whole forward steps of up to `max_rows` decodes at `context` tokens, as the model runner runs them
    (`step`), and the same step's modules alone on a prepared batch (`modules`). Used by the profile's step
    timings and by the probe that checks a cached profile."""

    def __init__(self, loaded: LoadedModel, device: torch.device, max_rows: int, context: int) -> None:
        arch = loaded.arch
        self.net, self.device, self.context = loaded.model, device, context
        per_row = -(-context // _BLOCK_SIZE)
        cap = _GPU_KV_BYTES if device.type == "cuda" else _CPU_KV_BYTES
        fit = cap // kv_block_bytes(arch, _BLOCK_SIZE, loaded.dtype)
        num_blocks = max(per_row + 1, min(max_rows * per_row + 1, fit))
        self.cache = PagedKVCache(arch, num_blocks, _BLOCK_SIZE, loaded.dtype, device)
        self.scale = arch.head_dim**-0.5
        # Rows share blocks when the cache cap is reached: what is timed is the work, not the values read.
        self.tables = [[(i * per_row + b) % num_blocks for b in range(per_row)] for i in range(max_rows)]
        self.requests = [Request(f"profile-{i}", "profile", "LS", [1], SamplingParams()) for i in range(max_rows)]

    def _layers(
        self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: AttentionBatch
    ) -> torch.Tensor:
        for index, layer in enumerate(self.net.layers):
            q, k, v = layer.pre_attention(hidden, cos, sin)
            hidden = layer.post_attention(paged_attention(index, q, k, v, self.cache, batch, self.scale), hidden)
        return hidden

    def _inputs(self, rows: int) -> tuple[AttentionBatch, torch.Tensor, torch.Tensor, torch.Tensor]:
        device, context = self.device, self.context
        batch = AttentionBatch.build([(self.tables[i], context - 1) for i in range(rows)], [], _BLOCK_SIZE, device)
        hidden = self.net.embed(torch.tensor([1] * rows, dtype=torch.long, device=device))
        cos, sin = self.net.rope(torch.tensor([context - 1] * rows, dtype=torch.long, device=device), hidden.dtype)
        return batch, hidden, cos, sin

    def step(self, rows: int) -> Callable[[], object]:
        """Host metadata built and uploaded, embedding and rotary tables, every layer with paged attention,
        logits and sampling with the API's default parameters, token ids back on the host."""

        def run() -> object:
            batch, hidden, cos, sin = self._inputs(rows)
            return sample(self.net.compute_logits(self._layers(hidden, cos, sin, batch)), self.requests[:rows])

        return run

    def modules(self, rows: int) -> Callable[[], object]:
        batch, hidden, cos, sin = self._inputs(rows)
        return lambda: self.net.compute_logits(self._layers(hidden, cos, sin, batch))


def decode_step_shape(model: LatencyModel, rows: int, context: int) -> IterationShape:
    """The iteration a step of `rows` decodes at `context` tokens each is to the latency model."""
    return IterationShape(rows, 0.0, model.decode_load(rows, rows * context, context), rows)


@torch.inference_mode()
def _profile_steps(
    loaded: LoadedModel, device: torch.device, model: LatencyModel, row_counts: Sequence[int], context: int,
    repeats: int,
) -> list[tuple[IterationShape, float]]:  # fmt: skip
    """Timed whole forward steps of `rows` decodes at `context` tokens (`_DecodeSteps.step`).

    Each step is timed right next to its modules alone (layers and logits on a prepared batch); the sample is
    the model's own prediction plus what the step took beyond its modules, so that errors of the module fits
    are not read as overhead: on a GPU the median of the paired differences, on shared CPU cores (where
    foreign load only ever adds time) the fastest step less the fastest modules-only run."""
    steps = _DecodeSteps(loaded, device, max(row_counts), context)
    step, modules = steps.step, steps.modules
    step(max(row_counts))()  # warm up
    order = list(row_counts)
    rng = random.Random(2)
    pairs: dict[int, list[tuple[float, float]]] = {rows: [] for rows in row_counts}
    for _ in range(repeats):
        rng.shuffle(order)
        for rows in order:
            pairs[rows].append((_timed(step(rows), device, 1)[0], _timed(modules(rows), device, 1)[0]))
    samples: list[tuple[IterationShape, float]] = []
    for rows, timed in pairs.items():
        if device.type == "cuda":
            beyond = statistics.median(whole - parts for whole, parts in timed)
        else:
            beyond = min(whole for whole, _ in timed) - min(parts for _, parts in timed)
        shape = decode_step_shape(model, rows, context)
        samples.append((shape, model.predict(shape) + beyond))
    return samples


@torch.inference_mode()
def _profile_be_merge(
    loaded: LoadedModel, device: torch.device, row_counts: Sequence[int], repeats: int
) -> tuple[float, float]:
    """(fixed s, s per BE row per layer) of the piggyback path's extra work in every layer when BE rows are
    merged: their q/k/v copied to host memory for CPU attention, their attention output and residual copied
    back, and both concatenated with the accelerator's rows. Fitted over all layers as a non-negative line."""
    arch = loaded.arch
    heads, kv_heads, head_dim = arch.num_attention_heads, arch.num_key_value_heads, arch.head_dim
    largest = max(row_counts)
    pin = device.type == "cuda"  # the runtime registers its host buffers with the driver: pinned, as here
    host_q = torch.empty(largest, heads, head_dim, dtype=loaded.dtype, pin_memory=pin)
    host_kv = torch.empty(2, largest, kv_heads, head_dim, dtype=loaded.dtype, pin_memory=pin)
    host_out = torch.zeros(largest, heads * head_dim, dtype=loaded.dtype, pin_memory=pin)
    host_residual = torch.zeros(largest, arch.hidden_size, dtype=loaded.dtype, pin_memory=pin)
    gen = torch.Generator(device=device).manual_seed(3)
    hidden = torch.randn(_BE_BASE_ROWS + largest, arch.hidden_size, generator=gen, device=device).to(loaded.dtype)
    q = torch.randn(_BE_BASE_ROWS + largest, heads, head_dim, generator=gen, device=device).to(loaded.dtype)
    kv = torch.randn(2, _BE_BASE_ROWS + largest, kv_heads, head_dim, generator=gen, device=device).to(loaded.dtype)

    def merge(rows: int) -> Callable[[], object]:
        base, end = _BE_BASE_ROWS, _BE_BASE_ROWS + rows

        def run() -> object:
            out = None
            for _ in range(arch.num_hidden_layers):
                host_q[:rows].copy_(q[base:end], non_blocking=pin)
                host_kv[:, :rows].copy_(kv[:, base:end], non_blocking=pin)
                back = host_out[:rows].to(device, non_blocking=pin)
                residual = host_residual[:rows].to(device, non_blocking=pin)
                attn = torch.cat((q[:base].flatten(1), back))
                # (a tensor-parallel shard's attention output is narrower than the hidden state)
                out = torch.cat((hidden[:base], residual))[:, : attn.shape[1]] + attn
            return out

        return run

    merge(largest)()  # warm up
    order = list(row_counts)
    rng = random.Random(3)
    by_rows: dict[int, list[float]] = {}
    for _ in range(repeats):
        rng.shuffle(order)
        for rows in order:
            by_rows.setdefault(rows, []).extend(_timed(merge(rows), device, 1))
    # Contended CPU timings only ever gain time: their fastest run; a GPU's symmetric noise: the median.
    pick = statistics.median if device.type == "cuda" else min
    return fit_nonnegative_line([(float(rows), pick(ts)) for rows, ts in sorted(by_rows.items())])


def profile_latency(
    loaded: LoadedModel,
    device: torch.device | None = None,
    row_counts: Sequence[int] | None = None,
    repeats: int | None = None,
    attention_grid: Sequence[tuple[int, int, int, int]] | None = None,
    step_rows: Sequence[int] | None = None,
    be_rows: Sequence[int] | None = None,
) -> LatencyModel:
    """Time the model's Dense modules over `row_counts`, its logits, and paged attention over
    `attention_grid` (decode requests, decode context, prefill chunk, chunk start); fit the latency model.
    Then the BE path's per-layer merge work over `be_rows`, and whole forward steps of `step_rows` decodes,
    whose time beyond the fitted modules gives the fixed per-iteration cost and the per-sampled-row cost."""
    device = device or loaded.device
    gpu = device.type == "cuda"
    row_counts = row_counts or (GPU_ROW_COUNTS if gpu else CPU_ROW_COUNTS)
    repeats = repeats or (5 if gpu else 3)
    attention_grid = attention_grid or (GPU_ATTENTION_GRID if gpu else CPU_ATTENTION_GRID)
    started = time.perf_counter()
    dense_samples, logit_samples = _profile_dense(loaded, device, row_counts, repeats)
    attention_samples = _profile_attention(loaded, device, attention_grid, repeats)
    # On a GPU timing noise is symmetric: take medians. Shared CPU cores only ever add time: take minima.
    reduce: Literal["median", "min"] = "median" if gpu else "min"
    pick = statistics.median if gpu else min
    by_rows: dict[float, list[float]] = {}
    for rows, seconds in dense_samples:
        by_rows.setdefault(rows, []).append(seconds)
    by_load: dict[tuple[float, float], list[float]] = {}
    for prefill_load, decode_load, seconds in attention_samples:
        by_load.setdefault((prefill_load, decode_load), []).append(seconds)
    be_fixed_s, be_row_s = _profile_be_merge(loaded, device, be_rows or (GPU_BE_ROWS if gpu else CPU_BE_ROWS),
                                             repeats)  # fmt: skip
    model = LatencyModel(
        dense=StaircaseModel.fit(dense_samples, reduce=reduce),
        attention=LinearAttentionModel.fit([(p, d, pick(ts)) for (p, d), ts in by_load.items()]),
        logits=StaircaseModel.fit(logit_samples, reduce=reduce),
        be_merge_fixed_s=be_fixed_s,
        be_merge_row_s=be_row_s,
        decode_cost=decode_cost_in_use(loaded, device),
        dense_samples=tuple((rows, pick(ts)) for rows, ts in sorted(by_rows.items())),
    )
    steps = _profile_steps(loaded, device, model, step_rows or (GPU_STEP_ROWS if gpu else CPU_STEP_ROWS),
                           GPU_STEP_CONTEXT if gpu else CPU_STEP_CONTEXT, repeats)  # fmt: skip
    overhead_s, per_sampled_row_s = fit_step_overhead(model, steps)
    model = dataclasses.replace(model, overhead_s=overhead_s, per_sampled_row_s=per_sampled_row_s)
    log.info("profiled %s on %s in %.1f s", loaded.uri, device_name(device), time.perf_counter() - started)
    return model


# The probe that checks a cached profile before it is trusted: whole decode steps at three batch sizes (the
# profile's own step shapes, so a fresh profile predicts them closely), a few interleaved timings each.
GPU_PROBE_ROWS: tuple[int, ...] = (1, 32, 256)
CPU_PROBE_ROWS: tuple[int, ...] = (1, 8, 32)
GPU_PROBE_REPEATS, CPU_PROBE_REPEATS = 5, 3


@dataclass(frozen=True)
class ProbeTiming:
    """One probed shape: a step of `rows` decodes, what the cached profile predicts for it and what it took."""

    rows: int
    predicted_s: float
    measured_s: float

    def off_by(self) -> float:
        """How far apart prediction and measurement are, as a factor >= 1 in either direction (inf if either
        is not positive: such a prediction cannot be trusted)."""
        if self.predicted_s <= 0 or self.measured_s <= 0:
            return math.inf
        return max(self.measured_s / self.predicted_s, self.predicted_s / self.measured_s)


ProfileSource = Literal["cached", "reprofiled", "profiled"]


@dataclass(frozen=True)
class ProfileDecision:
    """What `load_or_profile` does with the cache: use it ("cached": verified by the probe), profile again
    ("reprofiled": the cached profile was off by more than the trust factor) or profile ("profiled": no
    cached profile for this key). `reason` is the sentence the log says."""

    source: ProfileSource
    reason: str
    off_by: float | None = None  # the worst probed shape's factor (None without a cached profile)


def judge_cached_profile(probes: Sequence[ProbeTiming] | None, trust_factor: float) -> ProfileDecision:
    """Trust a cached profile when no probed shape is off by more than `trust_factor` (in either direction: a
    too pessimistic model refuses LS requests and BE rows the SLO would allow, a too optimistic one breaks
    the SLO). `probes` None: there is no cached profile. Pure: timings in, decision out."""
    if trust_factor < 1:
        raise ValueError(f"trust_factor must be >= 1, got {trust_factor}")
    if probes is None:
        return ProfileDecision("profiled", "no cached profile for this model, dtype and device")
    if not probes:
        raise ValueError("judge_cached_profile needs at least one probe timing")
    worst = max(probes, key=ProbeTiming.off_by)
    off = worst.off_by()
    where = (f"a step of {worst.rows} decode row(s) took {worst.measured_s * 1e3:.3f} ms, the cached profile "
             f"predicts {worst.predicted_s * 1e3:.3f} ms")  # fmt: skip
    if off > trust_factor:
        return ProfileDecision("reprofiled", f"cached but off by {off:.2f}x > {trust_factor}x ({where})", off)
    return ProfileDecision("cached", f"cached and verified: within {off:.2f}x <= {trust_factor}x ({where})", off)


@torch.inference_mode()
def probe_latency(
    loaded: LoadedModel,
    model: LatencyModel,
    device: torch.device | None = None,
    row_counts: Sequence[int] | None = None,
    repeats: int | None = None,
) -> list[ProbeTiming]:
    """Time a few whole decode steps of the loaded model and pair each with `model`'s prediction. Repeats
    are interleaved over the shapes; a shape's time is its median on a GPU, its fastest run on shared CPU
    cores (foreign load only ever adds time), as the profile itself reduces its timings."""
    device = device or loaded.device
    gpu = device.type == "cuda"
    row_counts = row_counts or (GPU_PROBE_ROWS if gpu else CPU_PROBE_ROWS)
    repeats = repeats or (GPU_PROBE_REPEATS if gpu else CPU_PROBE_REPEATS)
    context = GPU_STEP_CONTEXT if gpu else CPU_STEP_CONTEXT
    steps = _DecodeSteps(loaded, device, max(row_counts), context)
    steps.step(max(row_counts))()  # warm up
    timings: dict[int, list[float]] = {rows: [] for rows in row_counts}
    for _ in range(repeats):
        for rows in row_counts:
            timings[rows] += _timed(steps.step(rows), device, 1)
    pick = statistics.median if gpu else min
    return [
        ProbeTiming(rows, model.predict(decode_step_shape(model, rows, context)), pick(times))
        for rows, times in timings.items()
    ]


def load_or_profile(
    loaded: LoadedModel,
    cache_dir: str | Path | None = None,
    trust_factor: float | None = None,
    probe: Callable[[LoadedModel, LatencyModel], Sequence[ProbeTiming]] = probe_latency,
    profile: Callable[[LoadedModel], LatencyModel] = profile_latency,
) -> LatencyModel:
    """The cached profile of this model on this device once a short probe agrees with it within
    `trust_factor` (default: slo_control.profile_trust_factor's), else a fresh one (then cached). For engine
    startup. Logs which it used and why. `probe` and `profile` are what measure (replaceable in tests)."""
    factor = SLOControlConfig().profile_trust_factor if trust_factor is None else trust_factor
    cache = Path(cache_dir) if cache_dir is not None else default_profile_dir()
    key = profile_key(loaded)
    cached = load_or_none(cache, key)
    decision = judge_cached_profile(None if cached is None else probe(loaded, cached), factor)
    path = cache / key.file_name()
    if decision.source == "cached":
        assert cached is not None
        log.info("latency profile %s: %s", path, decision.reason)
        return cached
    log.info("latency profile %s: %s; profiling %s now", path, decision.reason, loaded.uri)
    model = profile(loaded)
    try:
        model.save_to_cache(cache, key)
    except OSError as exc:  # a read-only home must not stop the runtime
        log.warning("could not cache the latency profile in %s: %s", cache, exc)
    log.info("latency profile %s: %s", path, "re-profiled" if decision.source == "reprofiled" else "profiled")
    return model


def fit_table(model: LatencyModel) -> list[tuple[float, float, float, float]]:
    """(rows, measured s, predicted s, relative error) for every profiled Dense row count."""
    return [
        (rows, measured, predicted := model.dense.predict(rows), abs(predicted - measured) / measured)
        for rows, measured in model.dense_samples
        if measured > 0
    ]


def profile_main(argv: list[str] | None = None) -> int:
    """`piggyback profile --config runtime.yaml [--out PATH] [--repeats N]`: profile, cache, print the fit."""
    from piggyback_runtime.config import ConfigError, RuntimeConfig
    from piggyback_runtime.model.loader import load_model

    parser = argparse.ArgumentParser(prog="piggyback profile", description=profile_main.__doc__)
    parser.add_argument("--config", required=True, help="path to the RuntimeConfig YAML (model, dtype, device)")
    parser.add_argument("--out", help="write the profile here (default: the cache file the runtime reads)")
    parser.add_argument("--repeats", type=int, help="timings per point (default 5 on GPU, 3 on CPU)")
    args = parser.parse_args(argv)
    try:
        config = RuntimeConfig.from_yaml(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    loaded = load_model(config.model, config.device)
    key = profile_key(loaded)
    started = time.perf_counter()
    model = profile_latency(loaded, repeats=args.repeats)
    elapsed = time.perf_counter() - started
    path = model.save(args.out, key) if args.out else model.save_to_cache(default_profile_dir(), key)
    print(f"model {key.model_uri}  dtype {key.dtype}  device {key.device_name}  ({elapsed:.1f} s)")
    print(f"{'rows':>6} {'measured ms':>12} {'predicted ms':>13} {'error':>7}")
    table = fit_table(model)
    for rows, measured, predicted, error in table:
        print(f"{rows:>6.0f} {measured * 1e3:>12.3f} {predicted * 1e3:>13.3f} {error:>7.1%}")
    mape = sum(e for *_, e in table) / len(table) if table else 0.0
    a = model.attention
    print(f"dense: {len(model.dense.steps)} steps, tile {model.dense.tile or 'none (smooth)'}, MAPE {mape:.1%}")
    print(
        f"attention: {a.intercept * 1e3:.3f} ms + {a.per_prefill_load * 1e9:.3f} ns/prefill pair "
        f"+ {a.per_decode_load * 1e9:.3f} ns/decode token ({model.decode_cost})"
    )
    print(f"step: {model.overhead_s * 1e3:.3f} ms per iteration + {model.per_sampled_row_s * 1e6:.2f} us per "
          "sampled row")  # fmt: skip
    print(f"BE merge: {model.be_merge_fixed_s * 1e3:.3f} ms + {model.be_merge_row_s * 1e6:.2f} us per BE row per layer")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO"))
    sys.exit(profile_main())
