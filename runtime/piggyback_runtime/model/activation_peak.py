"""The activation peak of the largest iteration a config allows, which the accelerator's KV cache must leave room
for (kv/sizing.py takes the figure; the engine passes `measure_activation_bytes` to it)."""

from __future__ import annotations

import torch

from piggyback_runtime.model.loader import LoadedModel


@torch.inference_mode()
def _largest_iteration(loaded: LoadedModel, num_tokens: int, num_logit_rows: int) -> None:
    """One iteration at the largest shape: `num_tokens` through every layer, causal attention over the chunk
    (a fused kernel, as the paged kernels: no score matrix), then fp32 logits for `num_logit_rows` (at most
    `num_tokens`) rows."""
    device, arch = loaded.device, loaded.arch
    tokens = torch.zeros(num_tokens, dtype=torch.long, device=device)
    positions = torch.arange(num_tokens, device=device)

    def attention(_: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0),
            is_causal=True, enable_gqa=arch.num_key_value_heads != arch.num_attention_heads,
        )  # fmt: skip
        return out.squeeze(0).transpose(0, 1)

    hidden = loaded.model.forward_layers(tokens, positions, attention)
    loaded.model.compute_logits(hidden[:num_logit_rows])


def estimate_activation_bytes(loaded: LoadedModel, num_tokens: int, num_logit_rows: int) -> int:
    """What one iteration at the largest shape holds at its peak, from the shapes (CPU has no allocator peak):
    a layer's live tensors (residual, normed input, q/k/v, the MLP's two intermediate activations and their
    product) plus fp32 logits and their sampling copy."""
    arch = loaded.arch
    element = torch.empty((), dtype=loaded.dtype).element_size()
    per_token = 3 * arch.hidden_size + arch.q_size + 2 * arch.kv_size + 3 * arch.intermediate_size
    return num_tokens * per_token * element + 2 * num_logit_rows * arch.vocab_size * 4


def measure_activation_bytes(loaded: LoadedModel, num_tokens: int, num_logit_rows: int) -> tuple[int, str]:
    """(bytes, how): the allocator's peak above the resident weights at the largest iteration on CUDA."""
    device = loaded.device
    if device.type != "cuda":
        return estimate_activation_bytes(loaded, num_tokens, num_logit_rows), "estimated from the shapes (CPU)"
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    baseline = torch.cuda.memory_allocated(device)
    _largest_iteration(loaded, num_tokens, num_logit_rows)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - baseline
    torch.cuda.empty_cache()  # the profile's blocks go back before the cache takes its share
    return peak, f"measured at {num_tokens} tokens and {num_logit_rows} logit rows"
