"""KV tensors of a paged cache: one [num_blocks, block_size, kv_heads, head_dim] tensor per layer for K and V."""

from __future__ import annotations

import torch

from piggyback_runtime.model.arch import ModelArch


def kv_block_bytes(arch: ModelArch, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block takes across all layers, K and V."""
    return block_size * arch.kv_bytes_per_token(torch.empty((), dtype=dtype).element_size())


class PagedKVCache:
    def __init__(
        self,
        arch: ModelArch,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
        pin_memory: bool = False,
    ) -> None:
        shape = (arch.num_hidden_layers, num_blocks, block_size, arch.num_key_value_heads, arch.head_dim)
        self.key = torch.zeros(shape, dtype=dtype, device=device, pin_memory=pin_memory)
        self.value = torch.zeros(shape, dtype=dtype, device=device, pin_memory=pin_memory)
        self.num_blocks = num_blocks
        self.block_size = block_size

    def write(self, layer: int, slots: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """Store the k/v rows of `slots` (flat index block * block_size + offset) for one layer."""
        self.key[layer].view(-1, *self.key.shape[-2:]).index_copy_(0, slots, key.to(self.key.dtype))
        self.value[layer].view(-1, *self.value.shape[-2:]).index_copy_(0, slots, value.to(self.value.dtype))
