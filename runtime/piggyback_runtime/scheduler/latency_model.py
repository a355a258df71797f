"""Latency model of one engine iteration on the accelerator (OmniServe §3.4), pure Python: no torch.

    latency = overhead + per_sampled_row × logit_rows + f_D(dense_rows)
              + f_A(prefill_attention_load, decode_attention_load) + f_L(logit_rows)
              + [BE rows merged] (be_merge_fixed + be_merge_per_row × be_rows_per_layer)

- `f_D` (`StaircaseModel`): Dense work of **all layers** (pre_attention + post_attention) for `dense_rows`
  rows. GPUs run a GEMM in tiles and waves, so latency is flat while the row count stays inside a tile/wave
  and jumps when it crosses a boundary: the fit is a monotone staircase, not a line.
- `f_A` (`LinearAttentionModel`): accelerator attention of all layers, linear in the attention load.
- `f_L` (optional `StaircaseModel`): final norm + lm_head for the rows that sample a token.
- `overhead_s` + `per_sampled_row_s` × logit_rows: what a whole forward step costs beyond the modules
  (metadata built and uploaded, embedding, sampling), fitted from timed whole steps (`fit_step_overhead`).
- `be_merge_*`: the piggyback path's extra per-layer work when BE rows are merged (rows copied out for CPU
  attention and their results copied back and concatenated in every layer), profiled separately.

Decode attention load follows the kernel in use (`decode_cost`): paged kernels read each decode's own context
(load = sum of contexts); a padded batch pays every row the longest context (load = rows × longest).

Closed loop (`OnlineCorrection`): the profile is a prediction made once; measured iteration times correct it
online, per regime, within a few iterations, whichever way reality drifts from the profile (a profile taken
while the host was busy is too pessimistic, one taken while it was idle too optimistic).

Units the engine must use (one meaning everywhere):
- A Dense row is one token through all layers. A BE decode row merged at one layer costs 1/num_layers of a
  full row; the engine caps BE rows per layer (`be_rows_per_layer`), and a per-layer cap of k rows costs k
  full-model rows (k rows in each of num_layers layers), so `dense_rows = ls_tokens + be_prefill_tokens +
  be_rows_per_layer`.
- Attention load counts (query, key) pairs: a decode with context length c (tokens in cache including its
  own) has load c; a prefill chunk of n queries starting at position s has load sum_{i<n} (s + i + 1) =
  n*s + n*(n+1)/2 (`prefill_chunk_load`). BE decode attention runs on host CPUs and is not in f_A.

The profile is cached as JSON keyed by `ProfileKey` (model, dtype, device, architecture hash, code version).
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import itertools
import json
import math
import os
import statistics
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

PROFILE_DIR_ENV = "PIGGYBACK_PROFILE_DIR"
DEFAULT_PROFILE_DIR = Path("~/.cache/piggyback/profiles")
# Bump when what is measured or how it is fitted changes: old cache files then stop matching their key.
PROFILE_FORMAT_VERSION = "2"  # 2: step overhead, BE merge cost, decode cost kind

Sample = tuple[float, float]  # (x, seconds)


# Two sub-batches read the Dense weights twice: an iteration is split only where that adds at most this share to
# its Dense time, i.e. where Dense work is compute-bound (Vidur's profiles: 70B-H100x4 +10 % at 2048 tokens, +30 %
# at 512; 7B-H100 +5 % at 2048, +47 % at 512).
SPLIT_MAX_DENSE_COST = 0.12

def prefill_chunk_load(start: float, num_tokens: float) -> float:
    """Attention load of a prefill chunk: queries start..start+n-1, each attends to every earlier position."""
    return num_tokens * start + num_tokens * (num_tokens + 1) / 2


# How decode attention cost grows with the batch's contexts, by kernel (see the module docstring).
DECODE_COST_SUM = "sum_of_contexts"  # paged kernels (Triton, the native CPU kernel): no padding
DECODE_COST_PADDED = "rows_times_longest"  # the padded torch path: every row gathers the longest context
DECODE_COSTS = (DECODE_COST_SUM, DECODE_COST_PADDED)


def decode_attention_load(cost: str, rows: float, total_context: float, longest_context: float) -> float:
    """The decode attention load f_A is fitted on, for `rows` decodes whose contexts sum to `total_context`."""
    if cost == DECODE_COST_PADDED:
        # The longest context is at least the mean (a caller that knows only the sum gets the sum back).
        return rows * max(longest_context, total_context / rows) if rows > 0 else 0.0
    if cost == DECODE_COST_SUM:
        return total_context
    raise ValueError(f"unknown decode attention cost {cost!r}; expected one of {', '.join(DECODE_COSTS)}")


def default_profile_dir() -> Path:
    return Path(os.environ.get(PROFILE_DIR_ENV) or DEFAULT_PROFILE_DIR).expanduser()


def arch_hash(arch: Mapping[str, Any]) -> str:
    """A stable short hash of an architecture description (e.g. dataclasses.asdict(ModelArch))."""
    return hashlib.sha256(json.dumps(arch, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --- f_D: staircase ---------------------------------------------------------------------------------------------
def isotonic(values: Sequence[float], weights: Sequence[float]) -> list[float]:
    """Pool-adjacent-violators: the least-squares non-decreasing fit (latency never drops with more rows)."""
    blocks: list[list[float]] = []  # [weighted mean, weight, count]
    for v, w in zip(values, weights, strict=True):
        blocks.append([v, w, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            v2, w2, n2 = blocks.pop()
            v1, w1, n1 = blocks.pop()
            blocks.append([(v1 * w1 + v2 * w2) / (w1 + w2), w1 + w2, n1 + n2])
    out: list[float] = []
    for v, _, n in blocks:
        out.extend([v] * int(n))
    return out


@dataclass(frozen=True)
class Step:
    lo: float  # first and last profiled x of the plateau
    hi: float
    value: float


@dataclass(frozen=True)
class StaircaseModel:
    """A monotone step function fitted to (x, seconds) samples.

    Inside a plateau (profiled points whose latencies agree within the noise tolerance) the latency is the
    plateau's: no interpolation. Between two plateaus the jump lies somewhere in the unprofiled gap:
    - `tile > 0`: every jump of the profile sits right after a multiple of `tile` (detected tile/wave width),
      so x up to the first multiple of `tile` in the gap costs the lower plateau, beyond it the upper one;
    - `tile == 0`: no tile width explains the jumps (a smooth, e.g. CPU, profile): interpolate linearly
      across the gap (on a line sampled sparsely this is exact; a "trapezoid" ramp on a GPU).
    Tile mode is kept only when its leave-one-out error on the profile is smaller. Beyond the last profiled x the model
    extrapolates the slope of the profile's upper half (rounded up to the tile in tile mode).
    """

    steps: tuple[Step, ...]
    tile: int = 0
    tail_slope: float = 0.0  # seconds per row beyond the last profiled x

    def __post_init__(self) -> None:
        object.__setattr__(self, "_his", [s.hi for s in self.steps])

    # -- prediction ------------------------------------------------------------------------------------------
    def predict(self, x: float) -> float:
        if x <= 0 or not self.steps:
            return 0.0
        steps = self.steps
        last = steps[-1]
        if x > last.hi:
            if self.tile:
                x = math.ceil(x / self.tile) * self.tile
            return last.value + self.tail_slope * (x - last.hi)
        i = bisect.bisect_left(self._his, x)  # type: ignore[attr-defined]
        step = steps[i]
        if x >= step.lo or i == 0:
            return step.value
        below = steps[i - 1]  # x lies in the gap (below.hi, step.lo)
        if self.tile:
            boundary = math.ceil(below.hi / self.tile) * self.tile
            return below.value if x <= boundary else step.value
        return below.value + (step.value - below.value) * (x - below.hi) / (step.lo - below.hi)

    __call__ = predict

    @property
    def max_x(self) -> float:
        return self.steps[-1].hi if self.steps else 0.0

    # -- fitting ---------------------------------------------------------------------------------------------
    @classmethod
    def fit(
        cls,
        samples: Iterable[Sample],
        rel_tol: float = 0.02,
        abs_tol: float | None = None,
        reduce: Literal["median", "min"] = "median",
    ) -> StaircaseModel:
        """Fit from (x, seconds) samples.

        reduce: how repeats of one x become one latency, and the monotone fit that follows.
        - "median" (symmetric noise, e.g. a dedicated GPU): an isolated point far above its neighbours (a
          disturbed timing run) is replaced by their median (a real step persists over the following points,
          a spike does not, and one spike would lift the whole least-squares monotone fit), then PAVA.
        - "min" (shared CPU cores, where foreign work only ever adds time): each x's fastest run, then the
          tightest upper bound that monotonicity and batch splitting allow (`_tightest_bound`). With noise
          that only adds, every value stays an upper bound of the true latency: safe for SLOs.
        rel_tol/abs_tol: latencies closer than max(abs_tol, rel_tol * value) are one plateau. With "median",
        abs_tol defaults to 3 × the median absolute deviation of the repeats (the timer's own noise).
        """
        by_x: dict[float, list[float]] = {}
        for x, seconds in samples:
            if x > 0:
                by_x.setdefault(float(x), []).append(float(seconds))
        if not by_x:
            raise ValueError("no samples with a positive row count to fit")
        xs = sorted(by_x)
        medians = [statistics.median(by_x[x]) for x in xs]
        if abs_tol is None and reduce == "median":
            deviations = [abs(s - m) for x, m in zip(xs, medians, strict=True) for s in by_x[x]]
            abs_tol = 3 * statistics.median(deviations) if deviations else 0.0
        # The spread of contended repeats says nothing about the noise of their minimum: rel_tol alone then.
        abs_tol = abs_tol or 0.0
        if reduce == "median":
            values = _despike(medians, abs_tol)
            fitted = isotonic(values, [len(by_x[x]) for x in xs])
        else:
            values = [min(by_x[x]) for x in xs]
            fitted = _tightest_bound(xs, values)
        steps = _plateaus(xs, fitted, rel_tol, abs_tol)
        slope = _tail_slope(xs, fitted)
        smooth = cls(tuple(steps), 0, slope)
        tile = _detect_tile(steps)
        if not tile:
            return smooth
        envelope = reduce == "min"
        tiled_error = _loo_error(xs, values, tile, rel_tol, abs_tol, envelope)
        smooth_error = _loo_error(xs, values, 0, rel_tol, abs_tol, envelope)
        return cls(tuple(steps), tile, slope) if tiled_error < smooth_error else smooth  # ties: no evidence of tiles

    # -- persistence -----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"steps": [asdict(s) for s in self.steps], "tile": self.tile, "tail_slope": self.tail_slope}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StaircaseModel:
        return cls(tuple(Step(**s) for s in data["steps"]), int(data["tile"]), float(data["tail_slope"]))


def _tightest_bound(xs: Sequence[float], values: Sequence[float]) -> list[float]:
    """The tightest upper bound of a latency that grows with x, from timings that noise can only inflate.

    Two facts bound t(x) from above: monotonicity, t(x_i) <= t(x_j) for x_j > x_i, and splitting, t(x_i) <=
    ceil(x_i / x_j) * t(x_j) for x_j < x_i (the rows could always run as smaller batches). The second bounds
    the last profiled point, which has nothing above it.
    """
    out = list(values)
    for i in range(1, len(out)):
        out[i] = min(out[i], min(math.ceil(xs[i] / xs[j]) * out[j] for j in range(i)))
    for i in range(len(out) - 2, -1, -1):
        out[i] = min(out[i], out[i + 1])
    return out


_SPIKE_RATIO = 1.3  # a point this far above the median of its neighbourhood is a timing spike


def _despike(values: Sequence[float], abs_tol: float) -> list[float]:
    """Replace isolated upward spikes by the median of the 5-point neighbourhood (the last point is kept)."""
    out = list(values)
    n = len(values)
    for i in range(n - 1):
        local = statistics.median(values[max(0, i - 2) : i + 3])
        if values[i] > local * _SPIKE_RATIO and values[i] - local > abs_tol:
            out[i] = local
    return out


def _plateaus(xs: Sequence[float], fitted: Sequence[float], rel_tol: float, abs_tol: float) -> list[Step]:
    # Greedy from the left: a plateau grows while its latencies stay within the tolerance of its first one
    # (bounding the plateau's total spread, so a slow ramp never turns into one long flat step).
    steps: list[Step] = []
    start = 0
    for i in range(1, len(xs) + 1):
        if i == len(xs) or fitted[i] - fitted[start] > max(abs_tol, rel_tol * fitted[start]):
            run = fitted[start:i]
            steps.append(Step(xs[start], xs[i - 1], sum(run) / len(run)))
            start = i
    return steps


def _tail_slope(xs: Sequence[float], fitted: Sequence[float]) -> float:
    # Average slope over the upper half of the profiled range: one noisy last step must not set it.
    if len(xs) < 2:
        return fitted[-1] / xs[-1] if xs else 0.0
    mid = bisect.bisect_left(xs, xs[-1] / 2)
    mid = min(mid, len(xs) - 2)
    return max(0.0, (fitted[-1] - fitted[mid]) / (xs[-1] - xs[mid]))


_TILE_CANDIDATES = (1024, 512, 256, 128, 64, 32, 16, 8, 4, 2)


def _detect_tile(steps: Sequence[Step]) -> int:
    """The largest width W such that every jump gap (hi_k, lo_k+1) holds a multiple of W in [hi_k, lo_k+1)."""
    gaps = [(a.hi, b.lo) for a, b in itertools.pairwise(steps)]
    if not gaps:
        return 0
    for width in _TILE_CANDIDATES:
        if all(math.ceil(lo / width) * width < hi for lo, hi in gaps):
            return width
    return 0


def _loo_error(
    xs: Sequence[float], values: Sequence[float], tile: int, rel_tol: float, abs_tol: float, lower_envelope: bool
) -> float:
    """Mean relative leave-one-out error of one gap mode on the interior profiled points."""
    errors: list[float] = []
    for i in range(1, len(xs) - 1):
        rest_x = [x for j, x in enumerate(xs) if j != i]
        rest_y = [y for j, y in enumerate(values) if j != i]
        fitted = _tightest_bound(rest_x, rest_y) if lower_envelope else isotonic(rest_y, [1.0] * len(rest_y))
        model = StaircaseModel(tuple(_plateaus(rest_x, fitted, rel_tol, abs_tol)), tile, 0.0)
        if values[i] > 0:
            errors.append(abs(model.predict(xs[i]) - values[i]) / values[i])
    return sum(errors) / len(errors) if errors else 0.0


# --- f_A: linear in attention load ------------------------------------------------------------------------------
def _solve(a: list[list[float]], b: list[float]) -> list[float] | None:
    """Gaussian elimination with partial pivoting for a small dense system; None if singular."""
    n = len(b)
    m = [[*row, b[i]] for i, row in enumerate(a)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        if abs(m[pivot][col]) < 1e-300:
            return None
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(n):
            if r != col:
                factor = m[r][col] / m[col][col]
                for c in range(col, n + 1):
                    m[r][c] -= factor * m[col][c]
    return [m[i][n] / m[i][i] for i in range(n)]


@dataclass(frozen=True)
class LinearAttentionModel:
    """f_A = intercept + per_prefill_load * prefill_load + per_decode_load * decode_load (all ≥ 0)."""

    intercept: float
    per_prefill_load: float
    per_decode_load: float

    def predict(self, prefill_load: float, decode_load: float) -> float:
        if prefill_load <= 0 and decode_load <= 0:
            return 0.0  # no accelerator attention at all this iteration
        return self.intercept + self.per_prefill_load * prefill_load + self.per_decode_load * decode_load

    @classmethod
    def fit(cls, samples: Iterable[tuple[float, float, float]]) -> LinearAttentionModel:
        """Non-negative least squares on (prefill_load, decode_load, seconds): every subset of the three
        coefficients is solved and the best feasible one kept (exact NNLS for three parameters).

        Negative coefficients would make more load look cheaper and break the planner's monotone search.
        """
        rows = [(1.0, float(p), float(d), float(s)) for p, d, s in samples]
        if not rows:
            raise ValueError("no attention samples to fit")
        best: tuple[float, list[float]] = (math.inf, [0.0, 0.0, 0.0])
        for mask in range(1, 8):
            cols = [c for c in range(3) if mask >> c & 1]
            ata = [[sum(r[i] * r[j] for r in rows) for j in cols] for i in cols]
            atb = [sum(r[i] * r[3] for r in rows) for i in cols]
            solution = _solve(ata, atb)
            if solution is None or any(v < 0 for v in solution):
                continue
            coef = [0.0, 0.0, 0.0]
            for c, v in zip(cols, solution, strict=True):
                coef[c] = v
            sse = sum((coef[0] + coef[1] * r[1] + coef[2] * r[2] - r[3]) ** 2 for r in rows)
            if sse < best[0]:
                best = (sse, coef)
        return cls(*best[1])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LinearAttentionModel:
        return cls(float(data["intercept"]), float(data["per_prefill_load"]), float(data["per_decode_load"]))


# --- the whole iteration --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class IterationShape:
    dense_rows: float  # full-model-equivalent Dense rows (see the module docstring)
    prefill_attention_load: float = 0.0  # LS and BE prefill chunks on the accelerator
    decode_attention_load: float = 0.0  # LS decodes (BE decode attention runs on the host)
    logit_rows: float = 0.0  # rows that sample a token this iteration (final norm + lm_head)
    be_rows_per_layer: float = 0.0  # BE rows merged per layer (the piggyback path's extra per-layer work)
    sub_batches: int = 1  # 2: the Dense layers run twice, on each half of the rows (piggyback.sub_batches)


@dataclass(frozen=True)
class ProfileKey:
    """What a cached profile is valid for; any field differing means a fresh profile."""

    model_uri: str
    dtype: str
    device_name: str
    arch_hash: str
    code_version: str = PROFILE_FORMAT_VERSION

    def file_name(self) -> str:
        digest = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]
        return f"profile-{digest}.json"


@dataclass(frozen=True)
class LatencyModel:
    dense: StaircaseModel
    attention: LinearAttentionModel
    logits: StaircaseModel | None = None
    overhead_s: float = 0.0  # fixed per-iteration cost outside the profiled modules (fitted: fit_step_overhead)
    per_sampled_row_s: float = 0.0  # per sampled row beyond lm_head (sampling, token ids out)
    be_merge_fixed_s: float = 0.0  # per iteration that merges any BE rows: all layers' copy-out/copy-back setup
    be_merge_row_s: float = 0.0  # per BE row per layer, over all layers (copies and concatenation)
    decode_cost: str = DECODE_COST_SUM  # how decode attention load is counted (decode_attention_load)
    # Profile points kept for reports (the `profile` CLI table, benchmarks): (rows, measured seconds).
    dense_samples: tuple[Sample, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        if self.decode_cost not in DECODE_COSTS:
            raise ValueError(f"decode_cost {self.decode_cost!r} is not one of {', '.join(DECODE_COSTS)}")

    def predict(self, shape: IterationShape) -> float:
        return self.predict_parts(shape.dense_rows, shape.prefill_attention_load, shape.decode_attention_load,
                                  shape.logit_rows, shape.be_rows_per_layer, shape.sub_batches)  # fmt: skip

    def predict_parts(
        self, dense_rows: float, prefill_load: float, decode_load: float, logit_rows: float = 0.0,
        be_rows_per_layer: float = 0.0, sub_batches: int = 1,
    ) -> float:  # fmt: skip
        """predict() without building an IterationShape (the planner's inner loop)."""
        seconds = self.overhead_s + self.dense_s(dense_rows, sub_batches) + self.attention.predict(prefill_load,
                                                                                                     decode_load)
        if logit_rows > 0:
            seconds += self.per_sampled_row_s * logit_rows
            if self.logits is not None:
                seconds += self.logits.predict(logit_rows)
        if be_rows_per_layer > 0:
            seconds += self.be_merge_fixed_s + self.be_merge_row_s * be_rows_per_layer
        return seconds

    def dense_s(self, rows: float, sub_batches: int = 1) -> float:
        """The Dense layers over `rows`; with two sub-batches they read the weights twice, on half the rows each
        (near free where the Dense work is compute-bound, up to twice the time where weight reads dominate)."""
        if sub_batches == 1 or rows < 2:
            return self.dense.predict(rows)
        half = math.floor(rows / 2)
        return self.dense.predict(half) + self.dense.predict(rows - half)

    def split_is_cheap(self, rows: float) -> bool:
        """Whether two sub-batches over `rows` add at most SPLIT_MAX_DENSE_COST to their Dense time."""
        return rows >= 2 and self.dense_s(rows, 2) <= (1 + SPLIT_MAX_DENSE_COST) * self.dense.predict(rows)

    def sub_batches_of(self, rows: float, prefills: bool, allowed: int) -> int:
        """The sub-batches an iteration of `rows` Dense rows runs in: `allowed` (the planner's 2 where CPU rows
        ride, `Planner._cpu_rows_ride`) when it prefills and the split is cheap, else 1. The planner splits by
        it and the SLO controller predicts by it, so the two agree."""
        return allowed if allowed > 1 and prefills and self.split_is_cheap(rows) else 1

    def decode_load(self, rows: float, total_context: float, longest_context: float) -> float:
        """The decode attention load of `rows` decodes on the kernel this model was profiled with."""
        return decode_attention_load(self.decode_cost, rows, total_context, longest_context)

    # -- persistence -----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "dense": self.dense.to_dict(),
            "attention": self.attention.to_dict(),
            "logits": None if self.logits is None else self.logits.to_dict(),
            "overhead_s": self.overhead_s,
            "per_sampled_row_s": self.per_sampled_row_s,
            "be_merge_fixed_s": self.be_merge_fixed_s,
            "be_merge_row_s": self.be_merge_row_s,
            "decode_cost": self.decode_cost,
            "dense_samples": [list(s) for s in self.dense_samples],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LatencyModel:
        logits = data.get("logits")
        return cls(
            dense=StaircaseModel.from_dict(data["dense"]),
            attention=LinearAttentionModel.from_dict(data["attention"]),
            logits=None if logits is None else StaircaseModel.from_dict(logits),
            overhead_s=float(data.get("overhead_s", 0.0)),
            per_sampled_row_s=float(data.get("per_sampled_row_s", 0.0)),
            be_merge_fixed_s=float(data.get("be_merge_fixed_s", 0.0)),
            be_merge_row_s=float(data.get("be_merge_row_s", 0.0)),
            decode_cost=str(data.get("decode_cost", DECODE_COST_SUM)),
            dense_samples=tuple((float(x), float(s)) for x, s in data.get("dense_samples", ())),
        )

    def save(self, path: str | Path, key: ProfileKey) -> Path:
        """Write {key, model} as JSON atomically (a concurrent reader never sees half a file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": asdict(key), "model": self.to_dict()}, indent=1))
        tmp.replace(path)
        return path

    def save_to_cache(self, cache_dir: str | Path, key: ProfileKey) -> Path:
        return self.save(Path(cache_dir) / key.file_name(), key)

    @classmethod
    def load(cls, path: str | Path) -> tuple[ProfileKey, LatencyModel]:
        data = json.loads(Path(path).read_text())
        return ProfileKey(**data["key"]), cls.from_dict(data["model"])


def load_or_none(cache_dir: str | Path | None, key: ProfileKey) -> LatencyModel | None:
    """The cached model for exactly this key, or None (missing, unreadable, or made for another key)."""
    path = Path(cache_dir if cache_dir is not None else default_profile_dir()) / key.file_name()
    try:
        stored_key, model = LatencyModel.load(path)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return model if stored_key == key else None


# --- model error ---------------------------------------------------------------------------------------------
class ModelError:
    """Prediction error of the latency model against measured iterations, for metrics.

    mape(): mean absolute percentage error |predicted − measured| / measured over the last `window`
    iterations; bias(): mean signed (predicted − measured) / measured (negative: the model under-predicts,
    which is the unsafe direction: the planner then lets in more BE than the SLO allows).
    """

    def __init__(self, window: int = 1000) -> None:
        self._errors: deque[float] = deque(maxlen=window)
        self._abs_sum = 0.0
        self._signed_sum = 0.0
        self.count = 0  # all iterations ever recorded
        self.last_predicted_s = 0.0
        self.last_measured_s = 0.0

    def record(self, predicted_s: float, measured_s: float) -> None:
        if measured_s <= 0:
            return
        error = (predicted_s - measured_s) / measured_s
        if len(self._errors) == self._errors.maxlen:
            old = self._errors[0]
            self._abs_sum -= abs(old)
            self._signed_sum -= old
        self._errors.append(error)
        self._abs_sum += abs(error)
        self._signed_sum += error
        self.count += 1
        self.last_predicted_s, self.last_measured_s = predicted_s, measured_s

    def mape(self) -> float:
        return self._abs_sum / len(self._errors) if self._errors else 0.0

    def bias(self) -> float:
        return self._signed_sum / len(self._errors) if self._errors else 0.0


# --- fixed per-iteration cost ---------------------------------------------------------------------------------
def fit_nonnegative_line(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares (intercept, slope) of y on x with both ≥ 0 (exact: the best of the feasible subsets)."""
    if not points:
        raise ValueError("no points to fit a line to")
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    candidates = [(max(0.0, mean_y), 0.0)]
    squares = sum(x * x for x, _ in points)
    if squares > 0:
        candidates.append((0.0, max(0.0, sum(x * y for x, y in points) / squares)))
    if spread > 0:
        slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / spread
        if slope >= 0 and mean_y - slope * mean_x >= 0:
            candidates.append((mean_y - slope * mean_x, slope))
    return min(candidates, key=lambda c: sum((c[0] + c[1] * x - y) ** 2 for x, y in points))


def fit_step_overhead(model: LatencyModel, samples: Iterable[tuple[IterationShape, float]]) -> tuple[float, float]:
    """(overhead_s, per_sampled_row_s) from timed whole iterations: what each took beyond the modules' profile.

    The residual measured − (f_D + f_A + f_L + BE merge) of every sample is reduced to its median per sampled
    row count (a disturbed run does not move a median), then fitted as a non-negative line in sampled rows:
    the intercept is the fixed per-iteration cost, the slope the per-row cost of sampling and token output.
    """
    bare = dataclasses.replace(model, overhead_s=0.0, per_sampled_row_s=0.0)
    by_rows: dict[float, list[float]] = {}
    for shape, measured_s in samples:
        by_rows.setdefault(float(shape.logit_rows), []).append(measured_s - bare.predict(shape))
    if not by_rows:
        raise ValueError("no timed iterations to fit the per-iteration overhead from")
    return fit_nonnegative_line([(rows, statistics.median(r)) for rows, r in sorted(by_rows.items())])


# --- closed loop: online correction -----------------------------------------------------------------------------
REGIMES = ("decode", "prefill", "decode+be", "prefill+be", "be-only")


def regime_of(prefill_load: float, be_rows_per_layer: float, decode_load: float = 0.0) -> int:
    """Which kind of iteration this is (an index into REGIMES): drift is tracked per kind, because what runs
    differs (prefill kernels, the BE path's copies) and so does how far each strays from the profile.

    "be-only": the piggyback path's own iterations, BE rows merged and nothing else (no decode, no prefill on
    the accelerator). They are a few milliseconds of per-layer overhead, not the Dense and attention work the
    other regimes are made of, and on a real engine they strayed from the profile the other way: measured on
    this repo's CPU runtime under overload, LS+BE iterations took 1.9× the profile while BE-only ones took
    0.7× (issue #26); sharing one factor doubled every BE-only prediction and pulled the LS+BE one down.
    """
    if be_rows_per_layer > 0 and prefill_load <= 0 and decode_load <= 0:
        return REGIMES.index("be-only")
    return (prefill_load > 0) + 2 * (be_rows_per_layer > 0)


class OnlineCorrection:
    """Measured ÷ predicted iteration time, tracked online per regime; predictions are multiplied by factor().

    Per regime a ratio estimator with a short half-life: factor = Σ wᵢ·measuredᵢ / Σ wᵢ·predictedᵢ, where an
    observation's weight halves every `half_life` later iterations (of any regime: the weights age with the
    engine's iterations, so what a regime measured long ago stops counting even when that regime is rarely
    run). A ratio of sums, not a mean of ratios: long iterations (the ones an SLO budget is about) weigh more
    than short ones, and there is no prior to forget, so a profile k× off is corrected exactly once
    `min_samples` iterations were seen, and a drift is followed within a few half-lives. A regime with fewer
    than `min_samples` observations, or none recent (its decayed weight below one observation's), borrows the
    all-regime figure (1.0 before anything was seen).

    One stalled iteration (a page fault, a collection, a neighbour's burst on a shared host) must not throw the
    controller off: an observation counts as at most `max_jump` × (or at least 1/`max_jump` ×) the regime's
    current estimate (the all-regime one for a regime's first), and every factor stays in [min_factor,
    max_factor]. A real shift of more than `max_jump` × still gets through, within a few half-lives.
    """

    def __init__(self, half_life: float = 8.0, min_samples: int = 3, max_jump: float = 3.0,
                 min_factor: float = 0.02, max_factor: float = 50.0) -> None:  # fmt: skip
        if half_life <= 0:
            raise ValueError(f"half_life must be > 0 observations, got {half_life}")
        if min_samples < 1:
            raise ValueError(f"min_samples must be at least 1, got {min_samples}")
        if max_jump <= 1:
            raise ValueError(f"max_jump must be > 1, got {max_jump}")
        if not 0 < min_factor <= 1 <= max_factor:
            raise ValueError(f"need 0 < min_factor <= 1 <= max_factor, got {min_factor}, {max_factor}")
        self.half_life = half_life
        self.decay = 0.5 ** (1.0 / half_life)
        self.min_samples = min_samples
        self.max_jump = max_jump
        self.min_factor, self.max_factor = min_factor, max_factor
        self._iterations = 0  # observations of any regime: the age of the weights
        # Per regime, and one more slot (index len(REGIMES)) for all regimes together: decayed Σ measured,
        # decayed Σ predicted and decayed count, as of iteration `at`, and the count of observations.
        self._stats = [_RegimeStats() for _ in range(len(REGIMES) + 1)]

    def _aged(self, stats: _RegimeStats) -> tuple[float, float, float]:
        age = self.decay ** (self._iterations - stats.at)
        return stats.measured * age, stats.predicted * age, stats.weight * age

    def _estimate(self, index: int) -> float | None:
        stats = self._stats[index]
        if stats.count == 0:
            return None
        return stats.measured / stats.predicted

    def observe(self, regime: int, predicted_s: float, measured_s: float) -> None:
        """One iteration ran: `predicted_s` is the uncorrected model's prediction, `measured_s` what it took."""
        if predicted_s <= 0 or measured_s <= 0:
            return
        self._iterations += 1
        overall = self._estimate(-1)
        for index in (regime, -1):
            stats = self._stats[index]
            ratio = measured_s / predicted_s
            current = self._estimate(index) if stats.count else overall
            if current is not None:
                ratio = min(current * self.max_jump, max(current / self.max_jump, ratio))
            ratio = min(self.max_factor, max(self.min_factor, ratio))
            measured, predicted, weight = self._aged(stats)
            stats.measured, stats.predicted = measured + ratio * predicted_s, predicted + predicted_s
            stats.weight, stats.at, stats.count = weight + 1.0, self._iterations, stats.count + 1

    def factor(self, regime: int) -> float:
        stats = self._stats[regime]
        if stats.count < self.min_samples or self._aged(stats)[2] < 1.0:
            stats = self._stats[-1]
            if stats.count < self.min_samples:
                return 1.0
        return min(self.max_factor, max(self.min_factor, stats.measured / stats.predicted))

    def samples(self, regime: int) -> int:
        return self._stats[regime].count


@dataclass
class _RegimeStats:
    measured: float = 0.0  # decayed Σ measured seconds (each clipped to max_jump of the estimate), as of `at`
    predicted: float = 0.0  # decayed Σ predicted seconds, as of `at`
    weight: float = 0.0  # decayed count of observations, as of `at`
    at: int = 0  # the iteration these sums were last aged to
    count: int = 0  # observations ever
