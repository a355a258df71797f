"""Accelerator attention over the paged KV cache: Triton kernels on CUDA, torch (SDPA) or the native CPU kernel
elsewhere.

One `AttentionBatch` is built per iteration and used by every layer. Its metadata (slots, block tables,
lengths, chunk offsets) is assembled on the host and staged into the caller's `HostStaging`
(`AttentionBatch.stage`), so it reaches the device in the iteration's one non-blocking upload together with
the model runner's own per-iteration data; building it never waits for the device. Which kernel runs decides
what attention costs (`attention_kernel`, `AttentionKernel.decode_cost_is_sum_of_contexts`), so the latency
model can follow the kernel in use.

- Triton (CUDA, fp16/bf16): `triton_paged` reads the blocks in place, decode and prefill alike.
- CPU: decodes run the native paged kernel; prefill chunks run SDPA.
- Torch elsewhere (and on CPU without the native kernel): decodes run as one batch padded to the longest
  context; prefill chunks run SDPA one per request, 4-D, causal without a materialised mask (a chunk that
  starts at position p uses a lower-right-aligned causal bias), so fused SDPA kernels apply.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from piggyback_runtime.attention import cpu_attention
from piggyback_runtime.config import ConfigError
from piggyback_runtime.kv.allocator import flat_slot
from piggyback_runtime.kv.cache import PagedKVCache
from piggyback_runtime.staging import HostStaging


class AttentionKernel(enum.Enum):
    TRITON_PAGED = "triton_paged"  # CUDA: paged decode and prefill kernels
    CPU_NATIVE_PAGED = "cpu_native_paged"  # CPU: native paged decode kernel, SDPA prefill
    TORCH_PADDED = "torch_padded"  # anywhere: decodes padded to the longest context, SDPA prefill

    @property
    def decode_cost_is_sum_of_contexts(self) -> bool:
        """True when decode attention reads each row's own context only (cost ∝ Σ contexts); False when every
        row pays for the longest context in the batch (cost ∝ rows × longest)."""
        return self is not AttentionKernel.TORCH_PADDED


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def attention_kernel(device: torch.device, head_dim: int, dtype: torch.dtype | None = None) -> AttentionKernel:
    """The kernel `paged_attention` uses for decodes on this device (and for prefill on CUDA) for a model of
    `dtype` (None: fp16/bf16, the dtypes models serve in)."""
    # fp32 models on CUDA (tests, references) take the torch path: with exact fp32 products the Triton
    # tiles spill registers (benchmarks/triton_aot.py), and fp32 is never a serving dtype.
    if device.type == "cuda" and dtype != torch.float32 and _triton_available():
        return AttentionKernel.TRITON_PAGED
    if device.type == "cpu" and head_dim % 32 == 0 and cpu_attention.native_available():
        return AttentionKernel.CPU_NATIVE_PAGED
    return AttentionKernel.TORCH_PADDED


FP8_KV_DTYPE = torch.float8_e4m3fn
FP8_E4M3_MAX = 448.0  # the largest finite e4m3 value: k/v beyond it saturate
# K and V are stored as value / scale and read back as stored x scale. Per-tensor scales of 1.0 are vLLM's default
# when a checkpoint carries no calibrated ones (k/v of Llama-family models sit far inside +-448); e4m3 keeps 3
# mantissa bits, so each stored element is within 2^-4 of its value.
FP8_KV_SCALE = 1.0
FP8_MIN_CAPABILITY = (8, 9)  # Ada (L4, L40) and Hopper (H100, H200) have fp8


def kv_cache_dtype(setting: str, device: torch.device, model_dtype: torch.dtype) -> torch.dtype:
    """The accelerator KV cache's element type for `engine.kv_cache_dtype` (auto: the model's dtype).

    fp8_e4m3 is refused, naming the field, on any device but a CUDA GPU with fp8 and for a model that is not
    fp16/bf16 (the CPU has no fp8 arithmetic: a CPU accelerator would only emulate it, slower than bf16)."""
    if setting == "auto":
        return model_dtype
    if setting != "fp8_e4m3":
        raise ConfigError(f"engine.kv_cache_dtype {setting!r} is not one of auto, fp8_e4m3")
    if device.type != "cuda":
        raise ConfigError(
            f"engine.kv_cache_dtype fp8_e4m3 needs a CUDA GPU with fp8 (compute capability 8.9 or newer: L4, "
            f"L40, H100, H200); this runtime's device is {device.type}: set engine.kv_cache_dtype to auto"
        )
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_MIN_CAPABILITY:
        raise ConfigError(
            f"engine.kv_cache_dtype fp8_e4m3 needs compute capability 8.9 or newer; "
            f"{torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}: set engine.kv_cache_dtype "
            "to auto"
        )
    if model_dtype not in (torch.float16, torch.bfloat16):
        raise ConfigError(f"engine.kv_cache_dtype fp8_e4m3 needs a bf16 or fp16 model (model.dtype), not {model_dtype}")
    return FP8_KV_DTYPE


def _padded_tables(tables: Sequence[Sequence[int]]) -> tuple[list[int], int]:
    """Block tables as one row-major [rows, width] list, rows padded with block 0 (never read: lengths bound reads)."""
    width = max((len(t) for t in tables), default=0)
    flat: list[int] = []
    for table in tables:
        flat.extend(table)
        flat.extend([0] * (width - len(table)))
    return flat, max(width, 1)


@dataclass
class PrefillSlice:
    query_start: int  # rows [query_start, query_start + num_queries) of the flat batch
    num_queries: int
    context_len: int  # tokens in cache after this chunk is written (num_computed + num_queries)
    block_table: torch.Tensor  # [num_blocks covering context_len] int32 on device


@dataclass
class AttentionBatch:
    slots: torch.Tensor  # [T] int64: cache slot of each row's new k/v
    num_decodes: int  # the first num_decodes rows are decodes
    decode_block_tables: torch.Tensor | None  # [num_decodes, max_blocks] int32
    decode_lengths: torch.Tensor | None  # [num_decodes] int32: context length of each decode
    max_decode_len: int  # the longest decode context, known on the host
    prefills: list[PrefillSlice]
    # Prefill chunks for the Triton kernel: [C] starts/counts/context lengths and [C, max_blocks] tables, int32.
    prefill_query_starts: torch.Tensor | None = None
    prefill_query_counts: torch.Tensor | None = None
    prefill_context_lens: torch.Tensor | None = None
    prefill_block_tables: torch.Tensor | None = None
    max_prefill_queries: int = 0
    _decode_mask: torch.Tensor | None = field(default=None, repr=False)

    @staticmethod
    def stage(
        decodes: list[tuple[list[int], int]],
        prefills: list[tuple[list[int], int, int]],
        block_size: int,
        staging: HostStaging,
        name: str = "attention_metadata",
    ) -> StagedAttentionBatch:
        """Stage the metadata into `staging` (the caller uploads it once, with everything else of the iteration).

        decodes: (block ids, position); prefills: (block ids, start position, num tokens). `name`: the part's
        name in `staging` (one per batch staged there: two sub-batches stage two).
        """
        slots = [flat_slot(blocks, position, block_size) for blocks, position in decodes]
        starts: list[int] = []
        counts: list[int] = []
        contexts: list[int] = []
        prefill_tables: list[list[int]] = []
        row = len(decodes)
        for blocks, start, count in prefills:
            slots.extend(flat_slot(blocks, position, block_size) for position in range(start, start + count))
            context = start + count
            starts.append(row)
            counts.append(count)
            contexts.append(context)
            prefill_tables.append(blocks[: -(-context // block_size)])
            row += count
        decode_lengths = [position + 1 for _, position in decodes]
        decode_flat, decode_width = _padded_tables([blocks for blocks, _ in decodes])
        prefill_flat, prefill_width = _padded_tables(prefill_tables)  # row i sliced to its length: chunk i's table
        # One int32 part (one host tensor, split into views on the device): per-iteration host time matters.
        parts = (slots, decode_flat, decode_lengths, starts, counts, contexts, prefill_flat)
        staging.add(name, torch.tensor([value for part in parts for value in part], dtype=torch.int32))
        return StagedAttentionBatch(
            name=name,
            part_sizes=tuple(len(part) for part in parts),
            num_decodes=len(decodes),
            decode_table_width=decode_width,
            max_decode_len=max(decode_lengths, default=0),
            prefill_query_starts=starts,
            prefill_query_counts=counts,
            prefill_context_lens=contexts,
            prefill_table_width=prefill_width,
            block_size=block_size,
        )

    @classmethod
    def build(
        cls,
        decodes: list[tuple[list[int], int]],
        prefills: list[tuple[list[int], int, int]],
        block_size: int,
        device: torch.device,
    ) -> AttentionBatch:
        """`stage` and upload on its own, for callers with nothing else to upload (the profiler, tests)."""
        staging = HostStaging(device)
        staged = cls.stage(decodes, prefills, block_size, staging)
        return staged.on_device(staging.upload())

    def decode_mask(self, block_size: int) -> torch.Tensor:
        """[num_decodes, 1, 1, max_blocks * block_size] bool (True = attend), for the padded torch path only;
        built on the device once per batch."""
        if self._decode_mask is None:
            assert self.decode_block_tables is not None and self.decode_lengths is not None
            width = self.decode_block_tables.shape[1] * block_size
            positions = torch.arange(width, device=self.decode_lengths.device)
            self._decode_mask = (positions[None, :] < self.decode_lengths[:, None])[:, None, None]
        return self._decode_mask


@dataclass(frozen=True)
class StagedAttentionBatch:
    """An iteration's attention metadata, staged into a `HostStaging` and waiting for its upload; what the host
    keeps (counts, offsets, longest lengths) is what the kernels' launch parameters need."""

    name: str  # the part's name in the staging
    # int32 words of slots, decode tables, decode lengths, chunk starts, counts, contexts, chunk tables
    part_sizes: tuple[int, ...]
    num_decodes: int
    decode_table_width: int
    max_decode_len: int
    prefill_query_starts: list[int]
    prefill_query_counts: list[int]
    prefill_context_lens: list[int]
    prefill_table_width: int
    block_size: int

    def on_device(self, uploaded: Mapping[str, torch.Tensor]) -> AttentionBatch:
        """The batch as device views into the staging's one upload (`HostStaging.upload()`'s result)."""
        slots, decode_tables, decode_lengths, starts, counts, contexts, prefill_tables = uploaded[self.name].split(
            self.part_sizes
        )
        decodes, num_prefills = self.num_decodes > 0, len(self.prefill_query_starts)
        prefill_tables = prefill_tables.view(num_prefills, self.prefill_table_width)
        slices = [
            PrefillSlice(start, count, context, prefill_tables[i, : -(-context // self.block_size)])
            for i, (start, count, context) in enumerate(
                zip(self.prefill_query_starts, self.prefill_query_counts, self.prefill_context_lens, strict=True)
            )
        ]
        return AttentionBatch(
            slots=slots.long(),  # index_copy_ takes int64 indices
            num_decodes=self.num_decodes,
            decode_block_tables=decode_tables.view(self.num_decodes, self.decode_table_width) if decodes else None,
            decode_lengths=decode_lengths if decodes else None,
            max_decode_len=self.max_decode_len,
            prefills=slices,
            prefill_query_starts=starts if slices else None,
            prefill_query_counts=counts if slices else None,
            prefill_context_lens=contexts if slices else None,
            prefill_block_tables=prefill_tables if slices else None,
            max_prefill_queries=max(self.prefill_query_counts, default=0),
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
    key_cache, value_cache = cache.key[layer], cache.value[layer]
    if key_cache.dtype == FP8_KV_DTYPE:
        _write_fp8(key_cache, batch.slots, k)
        _write_fp8(value_cache, batch.slots, v)
    else:
        cache.write(layer, batch.slots, k, v)
    kernel = attention_kernel(q.device, q.shape[-1], q.dtype)
    out = torch.empty_like(q)
    n = batch.num_decodes
    if kernel is AttentionKernel.TRITON_PAGED:
        from piggyback_runtime.attention import triton_paged

        if n:
            assert batch.decode_block_tables is not None and batch.decode_lengths is not None
            triton_paged.paged_decode_attention(
                q[:n], key_cache, value_cache, batch.decode_block_tables, batch.decode_lengths, scale,
                batch.max_decode_len, out=out[:n],
            )  # fmt: skip
        if batch.prefills:
            assert batch.prefill_block_tables is not None and batch.prefill_query_starts is not None
            assert batch.prefill_query_counts is not None and batch.prefill_context_lens is not None
            triton_paged.paged_prefill_attention(
                q, key_cache, value_cache, batch.prefill_block_tables, batch.prefill_query_starts,
                batch.prefill_query_counts, batch.prefill_context_lens, scale, batch.max_prefill_queries, out,
            )  # fmt: skip
        return out
    gqa = q.shape[1] != k.shape[1]  # SDPA maps query head h to KV head h // (Hq / Hkv), no copies
    if n and kernel is AttentionKernel.CPU_NATIVE_PAGED and key_cache.dtype != FP8_KV_DTYPE:
        # The native paged kernel reads the blocks in place: no gather, no padding.
        assert batch.decode_block_tables is not None and batch.decode_lengths is not None
        out[:n] = cpu_attention.paged_decode_attention(
            q[:n], key_cache, value_cache, batch.decode_block_tables, batch.decode_lengths, scale
        ).to(q.dtype)
    elif n:
        assert batch.decode_block_tables is not None
        # [n, blocks, block_size, Hkv, D] -> [n, Hkv, S, D]
        keys = _dequantized(key_cache[batch.decode_block_tables].flatten(1, 2).transpose(1, 2), q.dtype)
        values = _dequantized(value_cache[batch.decode_block_tables].flatten(1, 2).transpose(1, 2), q.dtype)
        out[:n] = F.scaled_dot_product_attention(
            q[:n].unsqueeze(2), keys, values, attn_mask=batch.decode_mask(cache.block_size), scale=scale,
            enable_gqa=gqa,
        ).squeeze(2)  # fmt: skip
    for p in batch.prefills:
        out[p.query_start : p.query_start + p.num_queries] = _sdpa_prefill(q, k, v, key_cache, value_cache, p, scale)
    return out


def _sdpa_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    chunk: PrefillSlice,
    scale: float,
) -> torch.Tensor:
    """One prefill chunk through SDPA with 4-D [1, heads, seq, D] tensors and no materialised mask."""
    rows = slice(chunk.query_start, chunk.query_start + chunk.num_queries)
    prior = chunk.context_len - chunk.num_queries
    kv_heads, head_dim = k.shape[1], k.shape[2]
    if prior == 0:  # a chunk from position 0 attends only to itself: no need to read the cache back
        keys, values = k[rows], v[rows]
    else:
        keys = key_cache[chunk.block_table].reshape(-1, kv_heads, head_dim)[: chunk.context_len]
        values = value_cache[chunk.block_table].reshape(-1, kv_heads, head_dim)[: chunk.context_len]
    # [S, H, D] -> [1, H, S, D]
    query_4d = q[rows].transpose(0, 1).unsqueeze(0)
    keys_4d = _dequantized(keys, q.dtype).transpose(0, 1).unsqueeze(0)
    values_4d = _dequantized(values, q.dtype).transpose(0, 1).unsqueeze(0)
    gqa = q.shape[1] != kv_heads
    if prior == 0:
        result = F.scaled_dot_product_attention(
            query_4d, keys_4d, values_4d, is_causal=True, scale=scale, enable_gqa=gqa
        )
    else:  # queries are the last num_queries positions: causal aligned to the lower right
        bias = causal_lower_right(chunk.num_queries, chunk.context_len)
        result = F.scaled_dot_product_attention(query_4d, keys_4d, values_4d, attn_mask=bias, scale=scale,
                                                enable_gqa=gqa)  # fmt: skip
    return result.squeeze(0).transpose(0, 1)


def _dequantized(stored: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cache elements in the query's dtype: fp8 ones times their scale."""
    if stored.dtype == FP8_KV_DTYPE:
        return stored.to(dtype) * FP8_KV_SCALE
    return stored.to(dtype)


def _write_fp8(layer_cache: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor) -> None:
    """Store rows as value / scale in e4m3, saturated at its largest finite value (written as bytes: index_copy_
    has no fp8 kernel)."""
    stored = (rows.float() / FP8_KV_SCALE).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(FP8_KV_DTYPE)
    flat = layer_cache.view(-1, *layer_cache.shape[-2:]).view(torch.uint8)
    flat.index_copy_(0, slots, stored.view(torch.uint8))
