"""Token sampling: greedy, temperature, top-k, top-p, with a reproducible generator per seeded request."""

from __future__ import annotations

import torch

from piggyback_runtime.request import Request


def request_generator(request: Request) -> torch.Generator | None:
    if request.params.seed is None:
        return None
    # One generator per request, advanced once per sampled token: the same seed gives the same text
    # whatever else shares the batch.
    if request.generator is None:
        request.generator = torch.Generator(device="cpu").manual_seed(request.params.seed)
    assert isinstance(request.generator, torch.Generator)
    return request.generator


def sample(logits: torch.Tensor, requests: list[Request]) -> list[int]:
    """logits [N, V] float32 (one row per request) -> one token id per request."""
    greedy_rows = [i for i, r in enumerate(requests) if r.params.greedy]
    tokens: list[int] = [0] * len(requests)
    if greedy_rows:
        picked = logits[greedy_rows].argmax(dim=-1).tolist()
        for row, token in zip(greedy_rows, picked, strict=True):
            tokens[row] = token
    random_rows = [i for i, r in enumerate(requests) if not r.params.greedy]
    if random_rows:
        cpu_logits = logits[random_rows].cpu()
        for row, row_logits in zip(random_rows, cpu_logits, strict=True):
            tokens[row] = _sample_row(row_logits, requests[row])
    return tokens


def _sample_row(logits: torch.Tensor, request: Request) -> int:
    params = request.params
    logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        cumulative = sorted_probs.cumsum(-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = cumulative - sorted_probs >= params.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=request_generator(request)).item())
