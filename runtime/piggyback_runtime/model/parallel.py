"""Tensor parallelism of the decoder: which slice of each weight a rank holds, and the two collectives the
forward pass needs (Megatron-LM's layout).

    q/k/v_proj, gate/up_proj   column-parallel: rank r holds rows [r·n/tp, (r+1)·n/tp) of the output features,
                               so it computes its own attention heads (and KV heads) and its share of the MLP
    o_proj, down_proj          row-parallel: rank r holds the matching input columns; the partial outputs are
                               summed across ranks (one all-reduce after each: two per layer)
    embed_tokens, lm_head      vocabulary-parallel: rank r holds rows [r·V'/tp, (r+1)·V'/tp) of the vocabulary
                               padded to V' (a multiple of tp); the embedding is an all-reduce of the ranks'
                               masked lookups, the logits an all-gather of the ranks' slices
    norms                      replicated

What crosses the link per layer and token is `allreduce_bytes_per_token_layer`, from the figures in model/arch.py
that sim/devices.py's TP model reads too, so the simulator and the runtime agree on it.

A rank's model is an ordinary `LlamaForCausalLM` built from `ModelArch.shard(tp)` (its heads, KV heads and
MLP width divided by tp); the KV cache, the attention kernels and the piggyback path see only that rank's
heads and need no change.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from piggyback_runtime.model.arch import TP_ALLREDUCES_PER_LAYER, tp_allreduce_message_bytes

# Column-parallel (split the output features, dim 0 of the weight and the bias), row-parallel (split the input
# features, dim 1) and vocabulary-parallel (dim 0, padded) tensors, by the end of their Hugging Face name.
COLUMN_PARALLEL = ("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias",
                   "gate_proj.weight", "up_proj.weight")  # fmt: skip
ROW_PARALLEL = ("o_proj.weight", "down_proj.weight")
VOCAB_PARALLEL = ("embed_tokens.weight", "lm_head.weight")


def padded_vocab(vocab_size: int, world_size: int) -> int:
    return -(-vocab_size // world_size) * world_size


def allreduce_bytes_per_token_layer(hidden_size: int, element_bytes: int) -> int:
    """Bytes each rank contributes to the all-reduces of one layer for one token (model/arch.py has the figures
    the simulator uses too). A ring all-reduce moves 2·(tp-1)/tp of this over each rank's link."""
    return TP_ALLREDUCES_PER_LAYER * tp_allreduce_message_bytes(hidden_size, element_bytes)


@dataclass(frozen=True)
class ShardSpec:
    """How a rank takes its part of one tensor: `dim` is None for a replicated tensor."""

    dim: int | None
    vocab: bool = False


def shard_spec(name: str) -> ShardSpec:
    if name.endswith(COLUMN_PARALLEL):
        return ShardSpec(0)
    if name.endswith(ROW_PARALLEL):
        return ShardSpec(1)
    if name.endswith(VOCAB_PARALLEL):
        return ShardSpec(0, vocab=True)
    return ShardSpec(None)


def shard_range(size: int, spec: ShardSpec, rank: int, world_size: int) -> tuple[int, int]:
    """[start, end) of this rank's slice along `spec.dim` of a tensor of `size` there (vocabulary slices are of
    the padded size and may run past `size`: the caller pads with zeros)."""
    per_rank = (padded_vocab(size, world_size) if spec.vocab else size) // world_size
    return rank * per_rank, (rank + 1) * per_rank


def take_shard(
    tensor_slice: object, shape: tuple[int, ...], spec: ShardSpec, rank: int, world_size: int
) -> torch.Tensor:
    """This rank's part of a tensor: `tensor_slice` is a full tensor or a safetensors slice (indexing it reads
    only the rows or columns asked for)."""
    if spec.dim is None:
        return tensor_slice[:]  # type: ignore[index]
    start, end = shard_range(shape[spec.dim], spec, rank, world_size)
    stop = min(end, shape[spec.dim])
    part = tensor_slice[start:stop] if spec.dim == 0 else tensor_slice[:, start:stop]  # type: ignore[index]
    if stop < end:  # the padded tail of the vocabulary: rows no token id reaches
        pad = torch.zeros((end - stop, *shape[1:]), dtype=part.dtype)
        part = torch.cat((part, pad))
    return part


class TensorParallelGroup:
    """A rank's place in the tensor-parallel group and the collectives the model runs.

    `device_group`: the process group of the data plane (NCCL on GPUs, gloo on CPUs). `local_only()` turns the
    collectives into shape-preserving no-ops: rank 0 profiles its shard (latency model, activation peak) while
    the other ranks are not in a forward pass.
    """

    def __init__(self, rank: int, world_size: int, device_group: object | None) -> None:
        self.rank = rank
        self.world_size = world_size
        self.device_group = device_group
        self._local = False

    @contextlib.contextmanager
    def local_only(self) -> Iterator[None]:
        previous, self._local = self._local, True
        try:
            yield
        finally:
            self._local = previous

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place (the partial outputs of a row-parallel linear, the masked embeddings)."""
        if self.world_size > 1 and not self._local:
            import torch.distributed as dist

            dist.all_reduce(tensor, group=self.device_group)
        return tensor

    def all_gather_last_dim(self, tensor: torch.Tensor) -> torch.Tensor:
        """The ranks' slices side by side along the last dimension (the vocabulary-parallel logits)."""
        if self.world_size == 1:
            return tensor
        if self._local:
            return tensor.repeat(*([1] * (tensor.dim() - 1)), self.world_size)
        import torch.distributed as dist

        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor, group=self.device_group)
        return torch.cat(parts, dim=-1)
