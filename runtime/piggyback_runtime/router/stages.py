"""Length-specialised stages of a pool's replicas: the plan, the DP that chooses it, and runtime refinement.

A pool's replicas are ordered into stages, each owning a half-open range of context lengths
[lower_tokens, upper_tokens); the last stage is unbounded above. A request enters the stage whose range holds
its current length and, as decode makes it longer, moves downstream (L4 / CascadeInfer, arXiv 2512.19179;
see shared/reference/l4.md). Why: a decode batch mixing short and long contexts runs attention slower than a
length-homogeneous one, so giving each replica a narrow range of lengths makes every replica faster.

QoE objective (the paper does not publish its formula; this one is ours, stated here and in README):
    QoE = − mean seconds per output token, token-weighted over the pool,
        = − (1 / Λ) Σ_stages λ_s / (k_s · μ_s − λ_s)
where λ_s is the decode token demand (tokens/s) produced at lengths in stage s's range, k_s its replica count,
μ_s the decode tokens/s one replica sustains when it serves only lengths in that range (from the latency
model: narrower, shorter ranges are faster), and Λ = Σ λ_s. Each stage is treated as one queue served at
k_s · μ_s (M/M/1 sojourn 1 / (capacity − demand)), so Σ λ_s / (k_s μ_s − λ_s) is, by Little's law, the
tokens in flight; dividing by Λ gives the mean time per token. An overloaded stage (λ_s ≥ k_s μ_s) costs
OVERLOAD_COST_S_PER_TOKEN × λ_s / (k_s μ_s) per token of demand: finite, so plans that all overload still
compare, and much worse than any feasible one. Migration cost is not in the objective (one transfer per
boundary crossing; the simulator charges it).

The DP: lengths are grouped into exponentially sized buckets (edges 0, b, 2b, 4b, ..., max_context), so B
buckets cover 100 to 100K tokens in about ten. Two levels: over the number of stages s (up to max_stages) and
over boundaries; best[s][j][r] = the lowest cost of covering buckets [0, j) with r replicas in s stages,
= min over i < j and 1 ≤ k ≤ r of best[s − 1][i][r − k] + cost(i, j, k), where cost(i, j, k) is the stage of
buckets [i, j) with k replicas. O(S·B²·R²) steps with B(B+1)/2 distinct rates: B = 10, R = 16 takes ~30 ms in
Python. Every replica is placed; the best s is chosen last.

Runtime refinement (`refine`): without re-running the DP, each pair of neighbouring stages moves their shared
boundary so the attention work per replica (sum of the current context lengths of the requests in a stage,
divided by its replicas) evens out, within a bounded step, and only when the imbalance exceeds a tolerance.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

# Cost per token of demand of an overloaded stage, in seconds × load ratio (see the module docstring).
OVERLOAD_COST_S_PER_TOKEN = 1e6
DEFAULT_FIRST_BUCKET_TOKENS = 256
DEFAULT_BUCKET_GROWTH = 2.0

# (lower_tokens, upper_tokens) -> decode tokens/s one replica sustains serving only lengths in that range.
ReplicaTokenRate = Callable[[int, int], float]


@dataclass(frozen=True)
class Stage:
    """Replicas serving context lengths in [lower_tokens, upper_tokens); upper None: unbounded."""

    index: int
    lower_tokens: int
    upper_tokens: int | None
    replicas: tuple[str, ...]

    def holds(self, length_tokens: int) -> bool:
        return self.lower_tokens <= length_tokens and (self.upper_tokens is None or length_tokens < self.upper_tokens)


class StagePlan:
    """Stages in order of length; contiguous, starting at 0 and unbounded at the end; every replica in one."""

    def __init__(self, stages: Sequence[Stage]) -> None:
        stages = tuple(stages)
        if not stages:
            raise ValueError("a stage plan needs at least one stage")
        seen: set[str] = set()
        for position, stage in enumerate(stages):
            if stage.index != position:
                raise ValueError(f"stage at position {position} has index {stage.index}; indices must be 0, 1, ...")
            if not stage.replicas:
                raise ValueError(f"stage {position} has no replicas")
            duplicate = seen.intersection(stage.replicas) or (len(set(stage.replicas)) < len(stage.replicas))
            if duplicate:
                raise ValueError(f"stage {position}: a replica may belong to only one stage ({sorted(stage.replicas)})")
            seen.update(stage.replicas)
            expected_lower = 0 if position == 0 else stages[position - 1].upper_tokens
            if stage.lower_tokens != expected_lower:
                raise ValueError(f"stage {position} starts at {stage.lower_tokens} tokens; it must start at "
                                 f"{expected_lower} (stages are contiguous from 0)")  # fmt: skip
            last = position == len(stages) - 1
            if last and stage.upper_tokens is not None:
                raise ValueError("the last stage must be unbounded above (upper_tokens None)")
            if not last and (stage.upper_tokens is None or stage.upper_tokens <= stage.lower_tokens):
                raise ValueError(f"stage {position}: upper_tokens {stage.upper_tokens} must exceed lower_tokens "
                                 f"{stage.lower_tokens}")  # fmt: skip
        self.stages = stages
        self._uppers = [s.upper_tokens for s in stages[:-1]]
        self._stage_of_replica = {r: s for s in stages for r in s.replicas}

    def __repr__(self) -> str:
        parts = [f"[{s.lower_tokens},{'inf' if s.upper_tokens is None else s.upper_tokens}):{','.join(s.replicas)}"
                 for s in self.stages]  # fmt: skip
        return f"StagePlan({' '.join(parts)})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StagePlan) and self.stages == other.stages

    def __hash__(self) -> int:
        return hash(self.stages)

    def __len__(self) -> int:
        return len(self.stages)

    @property
    def boundaries(self) -> tuple[int, ...]:
        """The upper bounds of all stages but the last (the lengths where a request moves downstream)."""
        return tuple(u for u in self._uppers if u is not None)

    @property
    def replicas(self) -> tuple[str, ...]:
        return tuple(r for s in self.stages for r in s.replicas)

    def stage_for(self, length_tokens: int) -> Stage:
        if length_tokens < 0:
            raise ValueError(f"length_tokens must be >= 0, got {length_tokens}")
        return self.stages[bisect.bisect_right(self.boundaries, length_tokens)]

    def stage_of(self, replica: str) -> Stage | None:
        return self._stage_of_replica.get(replica)

    def next_stage(self, stage: Stage) -> Stage | None:
        return self.stages[stage.index + 1] if stage.index + 1 < len(self.stages) else None

    def with_boundaries(self, boundaries: Sequence[int]) -> StagePlan:
        """The same stages and replicas with other boundaries (strictly increasing, one per inner boundary)."""
        if len(boundaries) != len(self.stages) - 1:
            raise ValueError(f"expected {len(self.stages) - 1} boundaries, got {len(boundaries)}")
        edges = [0, *boundaries, None]
        return StagePlan([Stage(s.index, edges[i], edges[i + 1], s.replicas) for i, s in enumerate(self.stages)])


def single_stage(replicas: Sequence[str]) -> StagePlan:
    return StagePlan([Stage(0, 0, None, tuple(replicas))])


# --- planning -------------------------------------------------------------------------------------------------
def exponential_bucket_edges(
    max_context_tokens: int,
    first_bucket_tokens: int = DEFAULT_FIRST_BUCKET_TOKENS,
    growth: float = DEFAULT_BUCKET_GROWTH,
) -> list[int]:
    """Bucket edges 0, first, first·growth, ..., ending at max_context_tokens (the last bucket may be shorter)."""
    if first_bucket_tokens < 1 or growth <= 1 or max_context_tokens < 1:
        raise ValueError(f"need max_context_tokens >= 1, first_bucket_tokens >= 1 and growth > 1; got "
                         f"{max_context_tokens}, {first_bucket_tokens}, {growth}")  # fmt: skip
    edges = [0]
    edge = float(first_bucket_tokens)
    while edge < max_context_tokens:
        edges.append(round(edge))
        edge *= growth
    edges.append(max_context_tokens)
    return edges


def bucket_token_demand(
    request_lengths: Sequence[tuple[int, int]], bucket_edges: Sequence[int], window_s: float
) -> list[float]:
    """Decode token demand per bucket (tokens/s) from (prompt_tokens, output_tokens) pairs seen over window_s:
    output token t of a request is produced at context length prompt + t, in whichever bucket holds that."""
    if window_s <= 0:
        raise ValueError(f"window_s must be > 0, got {window_s}")
    demand = [0.0] * (len(bucket_edges) - 1)
    inner = list(bucket_edges[1:-1])
    for prompt, output in request_lengths:
        start, end = prompt, prompt + output  # context lengths [start, end)
        first = bisect.bisect_right(inner, start)
        last = bisect.bisect_right(inner, max(start, end - 1))
        for b in range(first, last + 1):
            lo = max(start, bucket_edges[b] if b > 0 else 0)
            hi = min(end, bucket_edges[b + 1] if b + 1 < len(bucket_edges) - 1 else end)
            demand[b] += max(0, hi - lo)
    return [d / window_s for d in demand]


def stage_cost(demand_tokens_s: float, replicas: int, replica_tokens_s: float) -> float:
    """Σ-term of the objective for one stage: λ / (k μ − λ), or the overload cost (module docstring)."""
    if demand_tokens_s <= 0:
        return 0.0
    capacity = replicas * replica_tokens_s
    if capacity <= demand_tokens_s:
        return OVERLOAD_COST_S_PER_TOKEN * demand_tokens_s * demand_tokens_s / max(capacity, 1e-12)
    return demand_tokens_s / (capacity - demand_tokens_s)


def plan_qoe(
    plan: StagePlan, bucket_edges: Sequence[int], demand: Sequence[float], replica_token_rate: ReplicaTokenRate
) -> float:
    """The QoE of a plan whose boundaries are bucket edges: − mean seconds per output token (module docstring)."""
    total = sum(demand)
    if total <= 0:
        return 0.0
    cost = 0.0
    for stage in plan.stages:
        i = bucket_edges.index(stage.lower_tokens)
        j = len(bucket_edges) - 1 if stage.upper_tokens is None else bucket_edges.index(stage.upper_tokens)
        cost += stage_cost(sum(demand[i:j]), len(stage.replicas), replica_token_rate(bucket_edges[i], bucket_edges[j]))
    return -cost / total


def _check_planning_input(replicas: Sequence[str], bucket_edges: Sequence[int], demand: Sequence[float]) -> None:
    if not replicas:
        raise ValueError("plan_stages needs at least one replica")
    if len(set(replicas)) != len(replicas):
        raise ValueError(f"replica names must be unique: {list(replicas)}")
    if len(bucket_edges) < 2 or bucket_edges[0] != 0 or any(b <= a for a, b in itertools.pairwise(bucket_edges)):
        raise ValueError(f"bucket_edges must start at 0 and increase strictly: {list(bucket_edges)}")
    if len(demand) != len(bucket_edges) - 1:
        raise ValueError(f"{len(demand)} demand values for {len(bucket_edges) - 1} buckets")
    if any(d < 0 or math.isnan(d) for d in demand):
        raise ValueError("bucket demand must be >= 0 tokens/s")


def _plan_from_cuts(replicas: Sequence[str], bucket_edges: Sequence[int], cuts: Sequence[tuple[int, int]]) -> StagePlan:
    """cuts: (end bucket, replica count) per stage, in order; replicas are handed out in the order given."""
    stages, start_bucket, next_replica = [], 0, 0
    for index, (end_bucket, count) in enumerate(cuts):
        last = index == len(cuts) - 1
        stages.append(Stage(index, bucket_edges[start_bucket], None if last else bucket_edges[end_bucket],
                            tuple(replicas[next_replica:next_replica + count])))  # fmt: skip
        start_bucket, next_replica = end_bucket, next_replica + count
    return StagePlan(stages)


def plan_stages(
    replicas: Sequence[str],
    bucket_edges: Sequence[int],
    demand: Sequence[float],
    replica_token_rate: ReplicaTokenRate,
    max_stages: int | None = None,
) -> StagePlan:
    """The stage plan maximising QoE (module docstring) by DP over the buckets.

    replicas: the pool's replica names, in the order they are handed to stages (short stages first);
    bucket_edges: from exponential_bucket_edges; demand: decode tokens/s per bucket (bucket_token_demand);
    replica_token_rate(lower, upper): decode tokens/s one replica sustains serving only that range (the
    latency model's, e.g. token_rate_from_step_time); max_stages: an upper bound on the number of stages.
    """
    _check_planning_input(replicas, bucket_edges, demand)
    num_buckets, num_replicas = len(bucket_edges) - 1, len(replicas)
    stage_limit = min(num_buckets, num_replicas, max_stages or num_replicas)
    prefix = [0.0, *itertools.accumulate(demand)]
    rate_cache: dict[tuple[int, int], float] = {}

    def cost(i: int, j: int, k: int) -> float:
        if (i, j) not in rate_cache:
            rate_cache[(i, j)] = replica_token_rate(bucket_edges[i], bucket_edges[j])
        return stage_cost(prefix[j] - prefix[i], k, rate_cache[(i, j)])

    # best[s][j][r]: covering buckets [0, j) with r replicas in exactly s stages (s bounds the stage count).
    inf = math.inf
    best = [[[inf] * (num_replicas + 1) for _ in range(num_buckets + 1)] for _ in range(stage_limit + 1)]
    choice: dict[tuple[int, int, int], tuple[int, int]] = {}
    best[0][0][0] = 0.0
    for s in range(1, stage_limit + 1):
        for j in range(1, num_buckets + 1):
            for r in range(1, num_replicas + 1):
                for i in range(s - 1, j):
                    for k in range(1, r - (s - 1) + 1):
                        before = best[s - 1][i][r - k]
                        if before == inf:
                            continue
                        candidate = before + cost(i, j, k)
                        if candidate < best[s][j][r] - 1e-15:
                            best[s][j][r] = candidate
                            choice[(s, j, r)] = (i, k)
    final_s = min(range(1, stage_limit + 1), key=lambda s: (best[s][num_buckets][num_replicas], s))
    cuts: list[tuple[int, int]] = []
    s, j, r = final_s, num_buckets, num_replicas
    while s > 0:
        i, k = choice[(s, j, r)]
        cuts.append((j, k))
        s, j, r = s - 1, i, r - k
    return _plan_from_cuts(replicas, bucket_edges, list(reversed(cuts)))


def plan_stages_brute_force(
    replicas: Sequence[str], bucket_edges: Sequence[int], demand: Sequence[float], replica_token_rate: ReplicaTokenRate
) -> StagePlan:
    """Every contiguous partition of buckets × every split of replicas; for tests on small cases only."""
    _check_planning_input(replicas, bucket_edges, demand)
    num_buckets, num_replicas = len(bucket_edges) - 1, len(replicas)
    best_plan, best_qoe = None, -math.inf
    for num_stages in range(1, min(num_buckets, num_replicas) + 1):
        for ends in itertools.combinations(range(1, num_buckets), num_stages - 1):
            for counts in itertools.combinations(range(1, num_replicas), num_stages - 1):
                sizes = [b - a for a, b in itertools.pairwise((0, *counts, num_replicas))]
                plan = _plan_from_cuts(replicas, bucket_edges, list(zip((*ends, num_buckets), sizes, strict=True)))
                qoe = plan_qoe(plan, bucket_edges, demand, replica_token_rate)
                if qoe > best_qoe + 1e-15:
                    best_plan, best_qoe = plan, qoe
    assert best_plan is not None
    return best_plan


def token_rate_from_step_time(
    step_s: Callable[[Sequence[int]], float],
    kv_capacity_tokens: int,
    max_batch_rows: int,
    samples: int = 16,
) -> ReplicaTokenRate:
    """A ReplicaTokenRate from a decode step's time: a replica serving lengths in [lower, upper) holds as many
    rows as its KV (at the range's mean length) and max_batch_rows allow, with contexts spread evenly over the
    range; it produces one token per row per step. step_s(contexts) is e.g. DeviceProfile.iteration_s with
    one Dense row and one sampled row per context, so its length-mixing penalty makes wide ranges slower."""
    if kv_capacity_tokens < 1 or max_batch_rows < 1 or samples < 1:
        raise ValueError("kv_capacity_tokens, max_batch_rows and samples must be >= 1")

    def rate(lower: int, upper: int) -> float:
        mean = max(1.0, (lower + upper) / 2)
        rows = max(1, min(max_batch_rows, int(kv_capacity_tokens // mean)))
        # The batch's contexts: spread evenly over the range, `rows` of them (cycling `samples` distinct values).
        points = [max(1, int(lower + (upper - lower) * (i + 0.5) / samples)) for i in range(samples)]
        contexts = [points[i % samples] for i in range(rows)]
        return rows / step_s(contexts)

    return rate


# --- runtime refinement -----------------------------------------------------------------------------------------
def refine(
    plan: StagePlan,
    observed_lengths: Sequence[int],
    tolerance: float = 0.25,
    max_step_factor: float = 2.0,
    min_stage_tokens: int = 64,
) -> StagePlan:
    """Nudge each inner boundary so neighbouring stages carry similar attention work per replica.

    observed_lengths: the current context lengths of the pool's requests (running and waiting). A stage's work
    is the sum of the lengths it holds (decode attention reads every context token each step) divided by its
    replicas. For each boundary, left to right: if the heavier neighbour carries more than (1 + tolerance)
    times the lighter one's work per replica, the boundary moves to the observed length (or window end) within
    [boundary / max_step_factor, boundary × max_step_factor] that evens the two out best; stages keep at least
    min_stage_tokens of range. A bounded step per call keeps the boundary from chasing noise.
    """
    if tolerance < 0 or max_step_factor <= 1:
        raise ValueError(f"need tolerance >= 0 and max_step_factor > 1; got {tolerance}, {max_step_factor}")
    lengths = sorted(int(x) for x in observed_lengths)
    prefix = [0, *itertools.accumulate(lengths)]

    def work(lower: int, upper: int | None) -> float:
        lo = bisect.bisect_left(lengths, lower)
        hi = len(lengths) if upper is None else bisect.bisect_left(lengths, upper)
        return float(prefix[hi] - prefix[lo])

    boundaries = list(plan.boundaries)
    for b in range(len(boundaries)):
        lower = 0 if b == 0 else boundaries[b - 1]
        upper = None if b + 1 >= len(boundaries) else boundaries[b + 1]
        left_replicas = len(plan.stages[b].replicas)
        right_replicas = len(plan.stages[b + 1].replicas)

        def imbalance(boundary: int, lower: int = lower, upper: int | None = upper,
                      left_replicas: int = left_replicas, right_replicas: int = right_replicas) -> float:  # fmt: skip
            return work(lower, boundary) / left_replicas - work(boundary, upper) / right_replicas

        current = boundaries[b]
        left = work(lower, current) / left_replicas
        right = work(current, upper) / right_replicas
        if max(left, right) <= (1 + tolerance) * min(left, right) or max(left, right) == 0:
            continue
        low_limit = max(lower + min_stage_tokens, int(current / max_step_factor))
        high_limit = int(current * max_step_factor)
        if upper is not None:
            high_limit = min(high_limit, upper - min_stage_tokens)
        if low_limit > high_limit:
            continue
        window = lengths[bisect.bisect_left(lengths, low_limit):bisect.bisect_right(lengths, high_limit)]
        candidates = {low_limit, high_limit, current, *window, *(x + 1 for x in window if x + 1 <= high_limit)}
        boundaries[b] = min(sorted(candidates), key=lambda c: (abs(imbalance(c)), abs(c - current)))
    return plan.with_boundaries(boundaries)
