"""Triton attention over the paged KV cache, read in place: no gather of the context, no padding to the longest row.

The cache layout is `kv/cache.py`'s: per layer, K and V are [num_blocks, block_size, kv_heads, head_dim], and
token `pos` of a request lives in block `block_table[pos // block_size]` at offset `pos % block_size`. Each
kernel looks the block up per key tile, so any block size works and no copy of the context is ever made.

Decode (one query per sequence): the grid is sequence × kv head × split. One program takes the query heads of
its kv group together (they read the same K/V, so each K/V byte is loaded once per group), walks its split of
the context with an fp32 online softmax, and writes either the output (one split) or a partial output and its
log-sum-exp; a second kernel merges the splits. Splitting the context keeps the GPU busy when a few long
sequences would otherwise leave most SMs idle.

Prefill (chunked): a chunk's k/v are already in the cache when the kernel runs, so a chunk attends to its prior
KV and to itself through the same paged reads, causally (query at position p sees keys 0..p). The grid is
chunk × query tile × kv head; rows of a tile are (query token, query head of the group) pairs.

An fp8_e4m3 cache (engine.kv_cache_dtype) is read by casting each K/V tile to the query's dtype: with the
per-tensor scale of 1.0 (attention/paged.py, FP8_KV_SCALE) that cast is the dequantisation.

On CUDA tensors the kernels are compiled. On CPU tensors they run only under Triton's interpreter, which triton
picks when each @triton.jit function is defined: TRITON_INTERPRET=1 must be set before triton is first
imported (tests run the interpreter cases in a subprocess so that the rest of the process, the ahead-of-time
compile tests included, sees ordinary JIT functions).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch
import triton
import triton.language as tl

LOG2_E = 1.4426950408889634
# Minimum context tokens one decode split should cover: below this a split costs more to merge than it saves.
MIN_TOKENS_PER_SPLIT = 256
MAX_DECODE_SPLITS = 16
# Programs to aim for in a decode launch when no device is at hand to ask (about 2 per SM of an H100).
DEFAULT_TARGET_PROGRAMS = 264
# m_i starts finite so that a row whose keys are all masked never computes (-inf) - (-inf).
_NEG_LARGE = tl.constexpr(-1.0e30)
_INTERPRETED = bool(triton.knobs.runtime.interpret)  # decided once, as triton.jit decides it per kernel


@triton.jit
def _paged_decode_kernel(
    q_ptr, key_cache_ptr, value_cache_ptr, block_tables_ptr, context_lens_ptr,
    out_ptr, partial_out_ptr, partial_lse_ptr,
    scale_log2,
    stride_q_token, stride_q_head,
    stride_kv_block, stride_kv_slot, stride_kv_head,
    stride_table_row,
    stride_out_token, stride_out_head,
    GROUP_SIZE: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, KV_BLOCK_SIZE: tl.constexpr, NUM_SPLITS: tl.constexpr, EXACT_FP32: tl.constexpr,
):  # fmt: skip
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_q_heads = tl.num_programs(1) * GROUP_SIZE
    context_len = tl.load(context_lens_ptr + seq).to(tl.int32)
    # Each sequence's split length comes from its own context, read here on the device: the host passes no
    # length, so one launch (one captured CUDA graph) serves any context lengths. Whole key tiles per split;
    # the last split of a sequence may be shorter, or empty (it then reports lse -inf and drops out).
    tokens_per_split = tl.cdiv(tl.cdiv(tl.maximum(context_len, 1), NUM_SPLITS), BLOCK_N) * BLOCK_N
    split_start = split * tokens_per_split
    split_end = tl.minimum(split_start + tokens_per_split, context_len)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    head = kv_head * GROUP_SIZE + g
    g_valid = g < GROUP_SIZE
    d_valid = d < HEAD_DIM
    q = tl.load(
        q_ptr + seq * stride_q_token + head[:, None] * stride_q_head + d[None, :],
        mask=g_valid[:, None] & d_valid[None, :],
        other=0.0,
    )
    m_i = tl.full([BLOCK_G], _NEG_LARGE, tl.float32)
    l_i = tl.full([BLOCK_G], 0.0, tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    n = tl.arange(0, BLOCK_N)
    for tile_start in range(split_start, split_end, BLOCK_N):
        pos = tile_start + n
        key_valid = pos < split_end
        block = tl.load(block_tables_ptr + seq * stride_table_row + pos // KV_BLOCK_SIZE, mask=key_valid, other=0)
        kv_offset = block.to(tl.int64) * stride_kv_block + (pos % KV_BLOCK_SIZE) * stride_kv_slot
        kv_offset += kv_head * stride_kv_head
        kv_mask = key_valid[:, None] & d_valid[None, :]
        k = tl.load(key_cache_ptr + kv_offset[:, None] + d[None, :], mask=kv_mask, other=0.0).to(q.dtype)
        if EXACT_FP32:  # fp32 models get fp32 products, not TF32's 10-bit mantissa
            scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale_log2
        else:
            scores = tl.dot(q, tl.trans(k)) * scale_log2  # [BLOCK_G, BLOCK_N], fp32, log2 units
        scores = tl.where(key_valid[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(value_cache_ptr + kv_offset[:, None] + d[None, :], mask=kv_mask, other=0.0).to(q.dtype)
        if EXACT_FP32:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    safe_l = tl.where(l_i > 0.0, l_i, 1.0)  # an empty split (or context) contributes nothing
    result = acc / safe_l[:, None]
    out_mask = g_valid[:, None] & d_valid[None, :]
    if NUM_SPLITS == 1:
        out = out_ptr + seq * stride_out_token + head[:, None] * stride_out_head + d[None, :]
        tl.store(out, result.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        lse = tl.where(l_i > 0.0, m_i + tl.log2(safe_l), float("-inf"))
        partial_row = (seq * num_q_heads + head) * NUM_SPLITS + split  # partials are [seq, q head, split, D]
        tl.store(partial_out_ptr + partial_row[:, None] * HEAD_DIM + d[None, :], result, mask=out_mask)
        tl.store(partial_lse_ptr + partial_row, lse, mask=g_valid)


@triton.jit
def _merge_splits_kernel(
    partial_out_ptr, partial_lse_ptr, out_ptr,
    stride_out_token, stride_out_head,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr,
):  # fmt: skip
    seq = tl.program_id(0)
    head = tl.program_id(1)
    num_q_heads = tl.num_programs(1)
    s = tl.arange(0, NUM_SPLITS)
    d = tl.arange(0, BLOCK_D)
    d_valid = d < HEAD_DIM
    rows = (seq * num_q_heads + head) * NUM_SPLITS + s
    lse = tl.load(partial_lse_ptr + rows)
    lse_max = tl.max(lse, 0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    weights = tl.exp2(lse - lse_max)  # exp2(-inf) = 0: empty splits drop out
    total = tl.sum(weights, 0)
    parts = tl.load(partial_out_ptr + rows[:, None] * HEAD_DIM + d[None, :], mask=d_valid[None, :], other=0.0)
    merged = tl.sum(parts * weights[:, None], 0) / tl.where(total > 0.0, total, 1.0)
    out = out_ptr + seq * stride_out_token + head * stride_out_head + d
    tl.store(out, merged.to(out_ptr.dtype.element_ty), mask=d_valid)


@triton.jit
def _paged_prefill_kernel(
    q_ptr, key_cache_ptr, value_cache_ptr, block_tables_ptr,
    query_starts_ptr, query_counts_ptr, context_lens_ptr, out_ptr, key_tiles_ptr,
    scale_log2,
    stride_q_token, stride_q_head,
    stride_kv_block, stride_kv_slot, stride_kv_head,
    stride_table_row,
    stride_out_token, stride_out_head,
    GROUP_SIZE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, KV_BLOCK_SIZE: tl.constexpr, EXACT_FP32: tl.constexpr,
    COUNT_KEY_TILES: tl.constexpr,
):  # fmt: skip
    chunk = tl.program_id(0)
    tile = tl.program_id(1)
    kv_head = tl.program_id(2)
    query_start = tl.load(query_starts_ptr + chunk).to(tl.int32)
    num_queries = tl.load(query_counts_ptr + chunk).to(tl.int32)
    context_len = tl.load(context_lens_ptr + chunk).to(tl.int32)
    first_position = context_len - num_queries  # the chunk's queries sit at the end of its context

    r = tl.arange(0, BLOCK_M * BLOCK_G)
    query_index = tile * BLOCK_M + r // BLOCK_G
    g = r % BLOCK_G
    head = kv_head * GROUP_SIZE + g
    row_valid = (query_index < num_queries) & (g < GROUP_SIZE)
    query_pos = first_position + query_index
    d = tl.arange(0, BLOCK_D)
    d_valid = d < HEAD_DIM
    row_mask = row_valid[:, None] & d_valid[None, :]
    q_rows = (query_start + query_index).to(tl.int64) * stride_q_token + head * stride_q_head
    q = tl.load(q_ptr + q_rows[:, None] + d[None, :], mask=row_mask, other=0.0)

    m_i = tl.full([BLOCK_M * BLOCK_G], _NEG_LARGE, tl.float32)
    l_i = tl.zeros([BLOCK_M * BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_M * BLOCK_G, BLOCK_D], tl.float32)
    # Causal early exit: no query of this tile sees past its last query's position, and a tile past the
    # chunk's last query (the grid is sized for the longest chunk) has no query at all and reads no key.
    last_query = tl.minimum((tile + 1) * BLOCK_M, num_queries) - 1
    keys_end = tl.minimum(first_position + last_query + 1, context_len)
    keys_end = tl.where(tile * BLOCK_M < num_queries, keys_end, 0)
    n = tl.arange(0, BLOCK_N)
    key_tiles = 0
    for tile_start in range(0, keys_end, BLOCK_N):
        key_tiles += 1
        pos = tile_start + n
        key_valid = pos < keys_end
        block = tl.load(block_tables_ptr + chunk * stride_table_row + pos // KV_BLOCK_SIZE, mask=key_valid, other=0)
        kv_offset = block.to(tl.int64) * stride_kv_block + (pos % KV_BLOCK_SIZE) * stride_kv_slot
        kv_offset += kv_head * stride_kv_head
        kv_mask = key_valid[:, None] & d_valid[None, :]
        k = tl.load(key_cache_ptr + kv_offset[:, None] + d[None, :], mask=kv_mask, other=0.0).to(q.dtype)
        if EXACT_FP32:
            scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale_log2
        else:
            scores = tl.dot(q, tl.trans(k)) * scale_log2
        visible = key_valid[None, :] & (pos[None, :] <= query_pos[:, None])
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(value_cache_ptr + kv_offset[:, None] + d[None, :], mask=kv_mask, other=0.0).to(q.dtype)
        if EXACT_FP32:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    if COUNT_KEY_TILES:  # tests: how many key tiles each program read (compiled out otherwise)
        tl.store(key_tiles_ptr + (chunk * tl.num_programs(1) + tile) * tl.num_programs(2) + kv_head, key_tiles)
    result = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    out_rows = (query_start + query_index).to(tl.int64) * stride_out_token + head * stride_out_head
    tl.store(out_ptr + out_rows[:, None] + d[None, :], result.to(out_ptr.dtype.element_ty), mask=row_mask)


@dataclass(frozen=True)
class DecodeConfig:
    block_n: int = 64  # keys per tile
    num_warps: int = 4
    num_stages: int = 2


@dataclass(frozen=True)
class PrefillConfig:
    # 128 (query token, query head) rows × 64 keys over 8 warps: at head_dim 128 the 4-warp variant of this tile
    # spills and the 64-row one reuses each K/V tile half as often (benchmarks/triton_aot.py reports both).
    block_rows: int = 128
    block_n: int = 64
    num_warps: int = 8
    num_stages: int = 2


DEFAULT_DECODE_CONFIG = DecodeConfig()
DEFAULT_PREFILL_CONFIG = PrefillConfig()


def group_block(group_size: int) -> int:
    """Rows for a kv group's query heads: a power of two, at least 16 (tl.dot's smallest tile)."""
    return max(16, triton.next_power_of_2(group_size))


def head_dim_block(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def prefill_block_m(config: PrefillConfig, group_size: int) -> int:
    """Query tokens per prefill tile: as many as fit in `block_rows` with the whole kv group per token."""
    return max(1, config.block_rows // triton.next_power_of_2(group_size))


def num_decode_splits(num_seqs: int, num_kv_heads: int, max_context_len: int, target_programs: int) -> int:
    """Splits of the context per (sequence, kv head): enough programs to fill the device, no more splits than
    MIN_TOKENS_PER_SPLIT-token pieces of the longest context (rounded up to a power of two, so that few variants
    get compiled), at most MAX_DECODE_SPLITS."""
    by_length = max(1, max_context_len // MIN_TOKENS_PER_SPLIT)
    by_occupancy = max(1, -(-target_programs // max(1, num_seqs * num_kv_heads)))
    wanted = min(by_length, by_occupancy, MAX_DECODE_SPLITS)
    return 1 if wanted <= 1 else min(MAX_DECODE_SPLITS, triton.next_power_of_2(wanted))


@cache
def _target_programs(device_index: int) -> int:
    return 2 * torch.cuda.get_device_properties(device_index).multi_processor_count


def _launcher(kernel: triton.runtime.JITFunction, device: torch.device) -> triton.runtime.JITFunction:
    if device.type != "cuda" and not _INTERPRETED:
        raise RuntimeError(
            f"the Triton attention kernels need CUDA tensors (got {device.type}); to run them on the CPU under "
            "Triton's interpreter, set TRITON_INTERPRET=1 before triton is first imported"
        )
    return kernel


def _check(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor) -> tuple[int, int, int]:
    """-> (group size, head_dim, block size) after checking the shapes agree."""
    if key_cache.dim() != 4 or key_cache.shape != value_cache.shape:
        raise ValueError(
            f"key/value caches must both be [num_blocks, block_size, kv_heads, head_dim], got "
            f"{tuple(key_cache.shape)} and {tuple(value_cache.shape)}"
        )
    if key_cache.stride() != value_cache.stride() or key_cache.stride(-1) != 1:
        raise ValueError("key and value caches must share strides with a contiguous head_dim")
    _, block_size, kv_heads, head_dim = key_cache.shape
    if q.dim() != 3 or q.shape[2] != head_dim or q.shape[1] % kv_heads or q.stride(-1) != 1:
        raise ValueError(
            f"q must be [tokens, q_heads, {head_dim}] with q_heads a multiple of {kv_heads} kv heads and a "
            f"contiguous last dimension, got {tuple(q.shape)}"
        )
    fp8_cache = key_cache.dtype == torch.float8_e4m3fn and q.dtype in (torch.float16, torch.bfloat16)
    if not fp8_cache and (q.dtype != key_cache.dtype or q.dtype not in (torch.float16, torch.bfloat16, torch.float32)):
        raise ValueError(f"q ({q.dtype}) and the KV cache ({key_cache.dtype}) must share one of fp16/bf16/fp32 "
                         "(or an fp16/bf16 q over an fp8_e4m3 cache)")  # fmt: skip
    return q.shape[1] // kv_heads, head_dim, block_size


def paged_decode_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    max_context_len: int,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    config: DecodeConfig = DEFAULT_DECODE_CONFIG,
) -> torch.Tensor:
    """One query per sequence against its paged context: q [S, Hq, D] -> [S, Hq, D].

    block_tables [S, max_blocks] (entries past a sequence's blocks are never read), context_lens [S] (tokens,
    the query's own included), max_context_len: the largest of them, known on the host (no device read), used
    only to choose `num_splits` when none is given. Where each split starts is computed on the device from
    each sequence's own length, so with `num_splits` fixed (CUDA graphs: one per padded batch size) the launch
    depends on no per-step host value.
    """
    group, head_dim, block_size = _check(q, key_cache, value_cache)
    num_seqs, num_q_heads = q.shape[0], q.shape[1]
    kv_heads = num_q_heads // group
    out = torch.empty_like(q) if out is None else out
    if num_seqs == 0:
        return out
    if num_splits is None:
        target = _target_programs(q.device.index or 0) if q.is_cuda else DEFAULT_TARGET_PROGRAMS
        num_splits = num_decode_splits(num_seqs, kv_heads, max_context_len, target)
    if num_splits < 1 or num_splits & (num_splits - 1):
        raise ValueError(f"num_splits must be a power of two, got {num_splits}")
    block_n = config.block_n
    if num_splits > 1:
        partial_out = torch.empty((num_seqs, num_q_heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
        partial_lse = torch.empty((num_seqs, num_q_heads, num_splits), dtype=torch.float32, device=q.device)
    else:  # the kernel writes the output directly; these are never touched
        partial_out = partial_lse = out
    kernel = _launcher(_paged_decode_kernel, q.device)
    kernel[(num_seqs, kv_heads, num_splits)](  # type: ignore[index]
        q, key_cache, value_cache, block_tables, context_lens,
        out, partial_out, partial_lse,
        scale * LOG2_E,
        q.stride(0), q.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP_SIZE=group, BLOCK_G=group_block(group), HEAD_DIM=head_dim, BLOCK_D=head_dim_block(head_dim),
        BLOCK_N=block_n, KV_BLOCK_SIZE=block_size, NUM_SPLITS=num_splits, EXACT_FP32=q.dtype == torch.float32,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    if num_splits > 1:
        merge = _launcher(_merge_splits_kernel, q.device)
        merge[(num_seqs, num_q_heads)](  # type: ignore[index]
            partial_out, partial_lse, out, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, BLOCK_D=head_dim_block(head_dim), NUM_SPLITS=num_splits, num_warps=4,
        )  # fmt: skip
    return out


def paged_prefill_attention(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_starts: torch.Tensor,
    query_counts: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    max_query_count: int,
    out: torch.Tensor,
    config: PrefillConfig = DEFAULT_PREFILL_CONFIG,
    key_tiles: torch.Tensor | None = None,
) -> torch.Tensor:
    """Prefill chunks against their paged context (their own k/v already written), causally, into `out`.

    Chunk c's queries are rows query_starts[c] .. + query_counts[c] of q/out [T, Hq, D]; they sit at positions
    context_lens[c] - query_counts[c] .. context_lens[c] - 1. block_tables [C, max_blocks]. max_query_count:
    the largest query count, known on the host. Rows of `out` outside the chunks are left as they are.
    key_tiles: an int32 [C, query tiles, kv heads] tensor to receive the key tiles each program read (tests of
    the causal early exit); None in serving, where the count is compiled out.
    """
    group, head_dim, block_size = _check(q, key_cache, value_cache)
    num_chunks = query_starts.shape[0]
    if num_chunks == 0 or max_query_count == 0:
        return out
    kv_heads = q.shape[1] // group
    block_m = prefill_block_m(config, group)
    kernel = _launcher(_paged_prefill_kernel, q.device)
    grid = (num_chunks, -(-max_query_count // block_m), kv_heads)
    if key_tiles is not None and tuple(key_tiles.shape) != grid:
        raise ValueError(f"key_tiles must be {grid} (chunks, query tiles, kv heads), got {tuple(key_tiles.shape)}")
    kernel[grid](  # type: ignore[index]
        q, key_cache, value_cache, block_tables,
        query_starts, query_counts, context_lens, out, out if key_tiles is None else key_tiles,
        scale * LOG2_E,
        q.stride(0), q.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP_SIZE=group, BLOCK_G=triton.next_power_of_2(group), BLOCK_M=block_m, HEAD_DIM=head_dim,
        BLOCK_D=head_dim_block(head_dim), BLOCK_N=config.block_n, KV_BLOCK_SIZE=block_size,
        EXACT_FP32=q.dtype == torch.float32, COUNT_KEY_TILES=key_tiles is not None,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    return out
