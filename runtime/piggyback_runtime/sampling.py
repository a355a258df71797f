"""Token sampling for a whole batch on the device: greedy, temperature, top-k, top-p, in one set of tensor ops.

Per-row parameters travel as tensors (`SamplingTensors`), built on the host from the requests and uploaded
with the rest of the iteration's metadata; only the sampled token ids ever leave the device.

Randomness: each row draws with one uniform number u in [0, 1) derived on the host from (the request's seed,
the index of the token being sampled) by a counter-based hash (splitmix64). The token is the first one, in
vocabulary order, whose cumulative kept probability exceeds u (inverse-CDF sampling). Why this and not a
torch.Generator per request: a generator cannot be batched (one draw per row per kernel), and Gumbel-max
would need a noise value for every vocabulary entry of every row. A hash of (seed, step) needs no state
on the device, costs one number per row, and depends on nothing else in the batch, so a seeded request
draws the same u whatever shares its batch. Its tokens are then the same as long as its logits are: on the
CPU they are bit-identical whatever the batch; on a GPU matmul kernels may vary with the batch shape.
Unseeded requests get a random seed once, at their first sampled token.

Filters are thresholds: top-k and top-p find, per row, the smallest logit they keep (from the sorted
row), and the draw then runs over the unsorted row with everything below it removed. A row's draw thus
never depends on whether other rows in its batch needed sorting. Logits tied with the threshold are kept.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from piggyback_runtime.request import Request
from piggyback_runtime.staging import HostStaging

_MASK64 = (1 << 64) - 1


def splitmix64(value: int) -> int:
    """A 64-bit finaliser with full avalanche: neighbouring (seed, step) pairs give unrelated outputs."""
    z = (value + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def uniform_for(seed: int, step: int) -> float:
    """The row's uniform draw for output token number `step` of a request seeded with `seed`: in [0, 1)."""
    mixed = splitmix64((splitmix64(seed & _MASK64) ^ (step & _MASK64)) & _MASK64)
    return (mixed >> 11) / float(1 << 53)  # the top 53 bits: every float64 value in [0, 1) is reachable


def request_seed(request: Request) -> int:
    """The request's seed: its own, or a random one fixed at its first sampled token."""
    if request.params.seed is not None:
        return request.params.seed
    if not isinstance(request.generator, int):
        # `Request.generator` holds the sampler's per-request state; here that is just this seed.
        request.generator = random.getrandbits(63)
    return request.generator


@dataclass(frozen=True)
class SamplingTensors:
    """Sampling parameters of a batch's random rows (on the host when built, on the device once uploaded).

    Greedy rows (temperature 0 or top-k 1) need nothing but an argmax; the other R rows are listed in
    `random_rows` and the per-row parameters below are theirs, in that order. Which rows are which is known
    on the host, so the device never has to be asked.
    """

    random_rows: torch.Tensor  # [R] int64: batch rows that draw
    temperature: torch.Tensor  # [R] float32, > 0
    top_k: torch.Tensor  # [R] int64, the vocabulary size where there is no top-k filter
    top_p: torch.Tensor  # [R] float32, 1.0 where there is no top-p filter
    uniform: torch.Tensor  # [R] float64 in [0, 1): the row's draw
    filtered: torch.Tensor  # [F] int64: positions in `random_rows` with a top-k or top-p filter (sorted rows)

    @classmethod
    def build(cls, requests: list[Request], vocab_size: int) -> SamplingTensors:
        """Host tensors from the requests; `len(request.output_token_ids)` is the index of the token drawn."""
        rows, temperature, top_k, top_p, uniform, filtered = [], [], [], [], [], []
        for row, request in enumerate(requests):
            params = request.params
            if params.greedy:
                continue
            k = params.top_k if 0 < params.top_k < vocab_size else vocab_size
            if k < vocab_size or params.top_p < 1.0:
                filtered.append(len(rows))
            rows.append(row)
            temperature.append(params.temperature)
            top_k.append(k)
            top_p.append(params.top_p)
            uniform.append(uniform_for(request_seed(request), len(request.output_token_ids)))
        return cls(
            random_rows=torch.tensor(rows, dtype=torch.int64),
            temperature=torch.tensor(temperature, dtype=torch.float32),
            top_k=torch.tensor(top_k, dtype=torch.int64),
            top_p=torch.tensor(top_p, dtype=torch.float32),
            uniform=torch.tensor(uniform, dtype=torch.float64),
            filtered=torch.tensor(filtered, dtype=torch.int64),
        )

    def fields(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    @classmethod
    def from_fields(cls, tensors: dict[str, torch.Tensor]) -> SamplingTensors:
        return cls(**{name: tensors[name] for name in cls.__dataclass_fields__})

    def to(self, device: torch.device) -> SamplingTensors:
        return SamplingTensors.from_fields({name: t.to(device) for name, t in self.fields().items()})


def filter_thresholds(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """scaled [F, V] (logits / temperature) -> [F, 1]: the smallest logit each row's top-k then top-p keep."""
    sorted_logits, _ = scaled.sort(dim=-1, descending=True)
    rank = torch.arange(scaled.shape[-1], device=scaled.device)
    in_top_k = rank[None, :] < top_k[:, None]
    probs = torch.softmax(sorted_logits.masked_fill(~in_top_k, float("-inf")), dim=-1)
    # top-p keeps the smallest prefix whose mass reaches p: a token stays while the mass before it is < p.
    mass_before = probs.cumsum(-1) - probs
    kept = in_top_k & (mass_before < top_p[:, None])
    last_kept = kept.sum(-1, keepdim=True).clamp_min(1) - 1  # the first token always stays
    return sorted_logits.gather(-1, last_kept)


def draw(kept_probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: kept_probs [N, V] (unnormalised, >= 0), uniform [N] -> the first token whose
    cumulative mass exceeds u × total. float64 sums: a 128K-entry fp32 scan would blur rare tokens."""
    cumulative = kept_probs.double().cumsum(-1)
    target = (uniform * cumulative[:, -1]).unsqueeze(-1)
    index = torch.searchsorted(cumulative, target, right=True)
    return index.squeeze(-1).clamp_max(kept_probs.shape[-1] - 1)


def sample_on_device(logits: torch.Tensor, params: SamplingTensors) -> torch.Tensor:
    """logits [N, V] float32 on the device, params on the same device -> token ids [N] int64 on the device.

    No value is read on the host: which rows draw and which are filtered comes as index tensors whose
    lengths (host metadata) decide what runs. Every row's result depends on that row alone.
    """
    tokens = logits.argmax(dim=-1)
    if not params.random_rows.shape[0]:
        return tokens
    scaled = logits.index_select(0, params.random_rows) / params.temperature[:, None]
    if params.filtered.shape[0]:
        rows = params.filtered
        thresholds = filter_thresholds(scaled.index_select(0, rows), params.top_k[rows], params.top_p[rows])
        floor = torch.full((scaled.shape[0], 1), float("-inf"), device=logits.device)
        floor = floor.index_copy(0, rows, thresholds)
        scaled.masked_fill_(scaled < floor, float("-inf"))
    # Subtracting the row maximum keeps exp() finite; the scale cancels in the draw. In place: at a 128K
    # vocabulary every [N, V] temporary is 0.5 MiB per row, and the peak (logits, this, the float64 running
    # sum in `draw`: 16 bytes per entry) counts against the KV cache.
    kept_probs = scaled.sub_(scaled.amax(dim=-1, keepdim=True)).exp_()
    sampled = draw(kept_probs, params.uniform)
    return tokens.index_copy(0, params.random_rows, sampled)


def upload_sampling_tensors(staging: HostStaging, requests: list[Request], vocab_size: int) -> None:
    """Stage the requests' sampling parameters; `SamplingTensors.from_fields(staging.upload())` reads them."""
    for name, tensor in SamplingTensors.build(requests, vocab_size).fields().items():
        staging.add(name, tensor)


def sample(logits: torch.Tensor, requests: list[Request]) -> list[int]:
    """One token id per request (logits [N, V] float32): the whole-batch sampler, parameters up in one
    non-blocking copy, token ids read back at once (what the model runner does; the profiler times this)."""
    staging = HostStaging(logits.device)
    upload_sampling_tensors(staging, requests, logits.shape[-1])
    return sample_on_device(logits, SamplingTensors.from_fields(staging.upload())).tolist()
