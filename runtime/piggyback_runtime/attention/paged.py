"""Accelerator attention over the paged KV cache, in torch (SDPA): the portable path, CPU included.

One `AttentionBatch` is built per iteration (slot mapping, block tables, masks) and used by every layer.
Decodes (one query each) run as one padded batch; prefill chunks run one per request with a causal mask
that starts at the chunk's first position, so chunked and whole prefills give the same result.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from piggyback_runtime.attention import cpu_attention
from piggyback_runtime.kv.allocator import flat_slot
from piggyback_runtime.kv.cache import PagedKVCache


@dataclass
class PrefillSlice:
    query_start: int  # rows [query_start, query_start + num_queries) of the flat batch
    num_queries: int
    context_len: int  # tokens in cache after this chunk is written (num_computed + num_queries)
    block_table: torch.Tensor  # [num_blocks] int64 on device
    mask: torch.Tensor | None  # [num_queries, context_len] bool, None when the chunk starts at position 0


@dataclass
class AttentionBatch:
    slots: torch.Tensor  # [T] int64: cache slot of each row's new k/v
    num_decodes: int  # the first num_decodes rows are decodes
    decode_block_tables: torch.Tensor | None  # [num_decodes, max_blocks] int64
    decode_mask: torch.Tensor | None  # [num_decodes, 1, 1, max_blocks * block_size] bool (True = attend)
    decode_lengths: torch.Tensor | None  # [num_decodes] int32: context length of each decode
    prefills: list[PrefillSlice]

    @classmethod
    def build(
        cls,
        decodes: list[tuple[list[int], int]],
        prefills: list[tuple[list[int], int, int]],
        block_size: int,
        device: torch.device,
    ) -> AttentionBatch:
        """decodes: (block ids, position); prefills: (block ids, start position, num tokens)."""
        slots: list[int] = []
        for blocks, position in decodes:
            slots.append(flat_slot(blocks, position, block_size))
        slices: list[PrefillSlice] = []
        row = len(decodes)
        for blocks, start, count in prefills:
            for position in range(start, start + count):
                slots.append(flat_slot(blocks, position, block_size))
            context = start + count
            mask = None
            if start > 0:
                query_pos = torch.arange(start, context, device=device)[:, None]
                mask = torch.arange(context, device=device)[None, :] <= query_pos
            table = torch.tensor(blocks[: -(-context // block_size)], dtype=torch.long, device=device)
            slices.append(PrefillSlice(row, count, context, table, mask))
            row += count
        decode_tables = decode_mask = lengths = None
        if decodes:
            width = max(len(blocks) for blocks, _ in decodes)
            decode_tables = torch.tensor(
                [blocks + [0] * (width - len(blocks)) for blocks, _ in decodes], dtype=torch.long, device=device
            )
            lengths = torch.tensor([position + 1 for _, position in decodes], dtype=torch.int32, device=device)
            decode_mask = (torch.arange(width * block_size, device=device)[None, :] < lengths[:, None])[:, None, None]
        return cls(
            slots=torch.tensor(slots, dtype=torch.long, device=device),
            num_decodes=len(decodes),
            decode_block_tables=decode_tables,
            decode_mask=decode_mask,
            decode_lengths=lengths,
            prefills=slices,
        )


def paged_attention(
    layer: int,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache: PagedKVCache,
    batch: AttentionBatch,
    scale: float,
) -> torch.Tensor:
    """Write this layer's new k/v into the cache, then attend every row against its request's context.

    q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq, D].
    """
    cache.write(layer, batch.slots, k, v)
    key_cache, value_cache = cache.key[layer], cache.value[layer]
    kv_heads, head_dim = k.shape[1], q.shape[2]
    gqa = q.shape[1] != kv_heads  # SDPA maps query head h to KV head h // (Hq / Hkv), no copies
    out = torch.empty_like(q)
    n = batch.num_decodes
    if n and q.device.type == "cpu" and q.shape[-1] % 32 == 0 and cpu_attention.native_available():
        # On a CPU "accelerator" the native paged kernel reads the blocks in place: no gather, no padding.
        assert batch.decode_block_tables is not None and batch.decode_lengths is not None
        out[:n] = cpu_attention.paged_decode_attention(
            q[:n], key_cache, value_cache, batch.decode_block_tables, batch.decode_lengths, scale
        ).to(q.dtype)
    elif n:
        assert batch.decode_block_tables is not None and batch.decode_mask is not None
        # [n, blocks, block_size, Hkv, D] -> [n, Hkv, S, D]
        keys = key_cache[batch.decode_block_tables].flatten(1, 2).transpose(1, 2).to(q.dtype)
        values = value_cache[batch.decode_block_tables].flatten(1, 2).transpose(1, 2).to(q.dtype)
        out[:n] = F.scaled_dot_product_attention(
            q[:n].unsqueeze(2), keys, values, attn_mask=batch.decode_mask, scale=scale, enable_gqa=gqa
        ).squeeze(2)
    for p in batch.prefills:
        rows = slice(p.query_start, p.query_start + p.num_queries)
        if p.mask is None:  # a chunk from position 0 attends only to itself: no need to read the cache back
            keys, values = k[rows].transpose(0, 1), v[rows].transpose(0, 1)
        else:
            keys = key_cache[p.block_table].reshape(-1, kv_heads, head_dim)[: p.context_len].transpose(0, 1)
            values = value_cache[p.block_table].reshape(-1, kv_heads, head_dim)[: p.context_len].transpose(0, 1)
        out[rows] = F.scaled_dot_product_attention(
            q[rows].transpose(0, 1),
            keys.to(q.dtype),
            values.to(q.dtype),
            attn_mask=p.mask,
            is_causal=p.mask is None,
            scale=scale,
            enable_gqa=gqa,
        ).transpose(0, 1)
    return out
