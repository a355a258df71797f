"""Paged attention, Triton and torch paths, against a plain fp32 torch reference over the same paged layout.

Triton chooses its interpreter when triton is first imported (TRITON_INTERPRET=1), so the Triton cases run in
one subprocess (this file run as a script, which prints each case's error as JSON); the rest of the test
process keeps ordinary JIT kernels for the ahead-of-time compile tests. The interpreter's bf16 `tl.dot` is
wrong (numpy has no bf16: the interpreter's dot of bf16 tiles does not round like a tensor core), so the Triton
kernels' bf16 variants are only compiled here (test_triton_aot.py) and checked numerically on a GPU by
benchmarks/gpu_suite.py (kernels and correctness sections); here fp32 and fp16. The torch and native CPU paths
take bf16 in process (test_torch_paths_match_reference_in_bf16).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from piggyback_runtime.attention import paged
from piggyback_runtime.attention.paged import AttentionBatch, AttentionKernel
from piggyback_runtime.kv.cache import PagedKVCache
from piggyback_runtime.model.arch import ModelArch

FP16_TOLERANCE = 4e-3  # fp16 inputs, fp32 accumulation: error is the inputs' rounding
FP32_TOLERANCE = 2e-5


def tiny_arch(q_heads: int, kv_heads: int, head_dim: int, layers: int) -> ModelArch:
    return ModelArch(
        model_type="llama", vocab_size=32, hidden_size=q_heads * head_dim, intermediate_size=64,
        num_hidden_layers=layers, num_attention_heads=q_heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        max_position_embeddings=256,
    )  # fmt: skip


def make_cache(
    num_blocks: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shape = (num_blocks, block_size, kv_heads, head_dim)
    return torch.randn(shape, generator=gen).to(dtype), torch.randn(shape, generator=gen).to(dtype)


def scattered_tables(context_lens: list[int], block_size: int, num_blocks: int, seed: int = 0) -> list[list[int]]:
    """Each sequence's blocks, drawn from a shuffled pool: neighbours in a sequence are not neighbours in memory."""
    pool = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
    tables = []
    for length in context_lens:
        count = -(-length // block_size)
        tables.append(pool[:count])
        pool = pool[count:]
    return tables


def padded(tables: list[list[int]]) -> torch.Tensor:
    width = max(1, max(len(t) for t in tables))
    return torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)


def reference_attention(
    q: torch.Tensor,  # [n, Hq, D]: queries at positions context_len - n .. context_len - 1
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    table: list[int],
    context_len: int,
    scale: float,
) -> torch.Tensor:
    """fp32 causal attention of one request's queries over its paged context; an empty context gives zeros."""
    n, q_heads, _ = q.shape
    if context_len == 0:
        return torch.zeros(q.shape)
    block_size, kv_heads = key_cache.shape[1], key_cache.shape[2]
    positions = torch.arange(context_len)
    blocks = torch.tensor(table)[positions // block_size]
    keys = key_cache[blocks, positions % block_size].float().repeat_interleave(q_heads // kv_heads, 1)
    values = value_cache[blocks, positions % block_size].float().repeat_interleave(q_heads // kv_heads, 1)
    scores = torch.einsum("nhd,khd->nhk", q.float(), keys) * scale
    query_positions = torch.arange(context_len - n, context_len)
    scores = scores.masked_fill(positions[None, None, :] > query_positions[:, None, None], float("-inf"))
    return torch.einsum("nhk,khd->nhd", scores.softmax(-1), values)


# ---- Triton cases (run under the interpreter in a subprocess) ----------------------------------------------


def _decode_case(
    context_lens: list[int], block_size: int, kv_heads: int, group: int, head_dim: int, dtype: torch.dtype,
    num_splits: int | None, block_n: int = 16,
) -> float:  # fmt: skip
    from piggyback_runtime.attention import triton_paged

    num_blocks = sum(-(-n // block_size) for n in context_lens) + 3
    key_cache, value_cache = make_cache(num_blocks, block_size, kv_heads, head_dim, dtype)
    tables = scattered_tables(context_lens, block_size, num_blocks)
    q = torch.randn(len(context_lens), kv_heads * group, head_dim, generator=torch.Generator().manual_seed(1))
    q = q.to(dtype)
    scale = head_dim**-0.5
    out = triton_paged.paged_decode_attention(
        q, key_cache, value_cache, padded(tables), torch.tensor(context_lens, dtype=torch.int32), scale,
        max(context_lens), num_splits=num_splits, config=triton_paged.DecodeConfig(block_n=block_n),
    )  # fmt: skip
    expected = torch.stack(
        [reference_attention(q[i : i + 1], key_cache, value_cache, t, n, scale)[0] for i, (t, n) in
         enumerate(zip(tables, context_lens, strict=True))]
    )  # fmt: skip
    return (out.float() - expected).abs().max().item()


def _prefill_case(
    chunks: list[tuple[int, int]], block_size: int, kv_heads: int, group: int, head_dim: int, dtype: torch.dtype,
    block_rows: int = 16, block_n: int = 16, leading_rows: int = 3,
) -> float:  # fmt: skip
    """chunks: (start position, num queries). The chunks' rows follow `leading_rows` rows that are not theirs
    (decodes in a real batch): those must come back untouched."""
    from piggyback_runtime.attention import triton_paged

    contexts = [start + count for start, count in chunks]
    num_blocks = sum(-(-n // block_size) for n in contexts) + 2
    key_cache, value_cache = make_cache(num_blocks, block_size, kv_heads, head_dim, dtype)
    tables = scattered_tables(contexts, block_size, num_blocks)
    total_rows = leading_rows + sum(count for _, count in chunks)
    q = torch.randn(total_rows, kv_heads * group, head_dim, generator=torch.Generator().manual_seed(2)).to(dtype)
    sentinel = 7.0
    out = torch.full_like(q, sentinel)
    starts = [leading_rows + sum(count for _, count in chunks[:i]) for i in range(len(chunks))]
    scale = head_dim**-0.5
    triton_paged.paged_prefill_attention(
        q, key_cache, value_cache, padded(tables), torch.tensor(starts, dtype=torch.int32),
        torch.tensor([c for _, c in chunks], dtype=torch.int32), torch.tensor(contexts, dtype=torch.int32), scale,
        max(c for _, c in chunks), out, config=triton_paged.PrefillConfig(block_rows=block_rows, block_n=block_n),
    )  # fmt: skip
    expected = torch.full(q.shape, sentinel)
    for row, (_, count), table, context in zip(starts, chunks, tables, contexts, strict=True):
        expected[row : row + count] = reference_attention(q[row : row + count], key_cache, value_cache, table,
                                                          context, scale)  # fmt: skip
    return (out.float() - expected).abs().max().item()


def _prefill_key_tiles_case() -> float:
    """The causal early exit: each prefill program reads exactly the key tiles up to its last query's position,
    and a query tile past its chunk's last query (the grid is sized for the longest chunk) reads none.
    Returns the number of programs that read another count (0 expected)."""
    from piggyback_runtime.attention import triton_paged

    block_size, kv_heads, group, head_dim, block_n = 8, 2, 4, 16, 16
    config = triton_paged.PrefillConfig(block_rows=16, block_n=block_n)
    block_m = triton_paged.prefill_block_m(config, group)  # 4 queries a tile
    chunks = [(0, 3), (40, 21), (7, 9)]  # (start, queries): 1, 6 and 3 tiles of queries; the grid has 6
    contexts = [start + count for start, count in chunks]
    num_blocks = sum(-(-n // block_size) for n in contexts) + 1
    key_cache, value_cache = make_cache(num_blocks, block_size, kv_heads, head_dim, F32)
    tables = scattered_tables(contexts, block_size, num_blocks)
    rows = sum(count for _, count in chunks)
    q = torch.randn(rows, kv_heads * group, head_dim, generator=torch.Generator().manual_seed(6))
    starts = [sum(count for _, count in chunks[:i]) for i in range(len(chunks))]
    max_queries = max(count for _, count in chunks)
    tiles = -(-max_queries // block_m)
    key_tiles = torch.full((len(chunks), tiles, kv_heads), -1, dtype=torch.int32)
    triton_paged.paged_prefill_attention(
        q, key_cache, value_cache, padded(tables), torch.tensor(starts, dtype=torch.int32),
        torch.tensor([c for _, c in chunks], dtype=torch.int32), torch.tensor(contexts, dtype=torch.int32),
        head_dim**-0.5, max_queries, torch.empty_like(q), config=config, key_tiles=key_tiles,
    )  # fmt: skip
    expected = torch.zeros_like(key_tiles)
    for c, (start, count) in enumerate(chunks):
        for tile in range(tiles):
            if tile * block_m < count:  # keys 0 .. the tile's last query position, in tiles of block_n
                last_position = start + min((tile + 1) * block_m, count) - 1
                expected[c, tile] = -(-(last_position + 1) // block_n)
    return float((key_tiles != expected).sum().item())


def _dispatch_case(dtype: torch.dtype) -> float:
    """paged_attention with the Triton kernel against paged_attention with the torch path: same AttentionBatch,
    same PagedKVCache, a batch of decodes and prefill chunks as the model runner builds it."""
    arch = tiny_arch(q_heads=8, kv_heads=2, head_dim=32, layers=2)
    block_size = 8
    decodes = [([3, 9, 1], 17), ([4], 0), ([12, 2], 15)]  # (blocks, position of the new token)
    prefills = [([5, 6, 7], 0, 20), ([8, 10, 11, 0], 16, 9)]  # (blocks, start, tokens)
    rows = len(decodes) + sum(p[2] for p in prefills)
    gen = torch.Generator().manual_seed(3)
    outputs = []
    for kernel in (AttentionKernel.TRITON_PAGED, AttentionKernel.TORCH_PADDED):
        cache = PagedKVCache(arch, 14, block_size, dtype, torch.device("cpu"))
        cache.key.copy_(torch.randn(cache.key.shape, generator=torch.Generator().manual_seed(4)))
        cache.value.copy_(torch.randn(cache.value.shape, generator=torch.Generator().manual_seed(5)))
        gen.manual_seed(3)
        q = torch.randn(rows, 8, arch.head_dim, generator=gen).to(dtype)
        k = torch.randn(rows, 2, arch.head_dim, generator=gen).to(dtype)
        v = torch.randn(rows, 2, arch.head_dim, generator=gen).to(dtype)
        batch = AttentionBatch.build(decodes, prefills, block_size, torch.device("cpu"))
        paged.attention_kernel = lambda device, head_dim, dtype=None, kernel=kernel: kernel  # type: ignore[assignment]
        outputs.append(paged.paged_attention(1, q, k, v, cache, batch, arch.head_dim**-0.5).float())
    return (outputs[0] - outputs[1]).abs().max().item()


F32, F16 = torch.float32, torch.float16
TRITON_CASES: dict[str, tuple[Callable[[], float], float]] = {
    # decode: lengths 1, block boundaries (8, 9, 16, 17), GQA group 4, blocks scattered in memory
    "decode_mixed_lengths_gqa_fp32": (lambda: _decode_case([1, 5, 8, 9, 16, 17, 33], 8, 2, 4, 32, F32, 1), 2e-5),
    "decode_mixed_lengths_gqa_fp16": (lambda: _decode_case([1, 5, 8, 9, 16, 17, 33], 8, 2, 4, 32, F16, 1), 4e-3),
    # split-K: 4 and 8 splits, short rows leave whole splits empty; the LSE merge must weigh them out
    "decode_split_k_4": (lambda: _decode_case([1, 40, 130, 7], 8, 2, 4, 32, F32, 4), 2e-5),
    "decode_split_k_8_fp16": (lambda: _decode_case([3, 97, 64, 1], 16, 1, 8, 16, F16, 8), 4e-3),
    "decode_split_k_heuristic": (lambda: _decode_case([600, 2], 16, 1, 2, 16, F32, None, block_n=64), 2e-5),
    # unequal splits: each sequence's split length comes from its own context (on the device): 100 tokens in 2
    # splits of 64 + 36, 129 in 64 + 65 -> whole tiles 80 + 49, 37 in one split and one empty
    "decode_split_k_unequal": (lambda: _decode_case([100, 129, 37, 16], 8, 2, 4, 32, F32, 2), 2e-5),
    # splits that see no visible key: 17 tokens in 8 splits of one 16-key tile: split 0 reads 16 keys, split 1
    # one key of a tile otherwise masked, splits 2-7 nothing (lse -inf, weighed out by the merge)
    "decode_split_sees_only_masked_keys": (lambda: _decode_case([17, 1, 2], 8, 1, 4, 16, F32, 8), 2e-5),
    "decode_split_sees_only_masked_keys_fp16": (lambda: _decode_case([17, 1, 300], 16, 2, 2, 32, F16, 16), 4e-3),
    # a context with no token yet gives zeros, not NaN
    "decode_empty_context": (lambda: _decode_case([0, 9], 8, 2, 2, 16, F32, 2), 2e-5),
    # odd shapes: block size 6, head_dim 24 (padded to 32), group 3 (padded to 16 rows), and MHA
    "decode_odd_shapes": (lambda: _decode_case([1, 6, 7, 13, 25], 6, 2, 3, 24, F32, 2), 2e-5),
    "decode_mha": (lambda: _decode_case([4, 31], 8, 4, 1, 16, F16, 1), 4e-3),
    # prefill: a chunk from 0, a chunk after prior context crossing blocks, a one-token chunk, a full block
    "prefill_chunks_gqa_fp32": (lambda: _prefill_case([(0, 5), (13, 7), (3, 1), (16, 16)], 8, 2, 4, 32, F32), 2e-5),
    "prefill_chunks_gqa_fp16": (lambda: _prefill_case([(0, 5), (13, 7), (3, 1), (16, 16)], 8, 2, 4, 32, F16), 4e-3),
    # several query tiles per chunk (block_rows 16 / group 4 = 4 queries a tile), odd block size and head_dim
    "prefill_tiles_odd_shapes": (lambda: _prefill_case([(0, 11), (10, 9)], 6, 2, 3, 24, F32, block_rows=16), 2e-5),
    "prefill_mha": (lambda: _prefill_case([(2, 19)], 8, 2, 1, 16, F32, block_rows=16), 2e-5),
    # causal early exit: programs read only the key tiles their queries can see (a mismatch count, not an error)
    "prefill_causal_early_exit_key_tiles": (_prefill_key_tiles_case, 0.0),
    # the dispatcher: AttentionBatch metadata and the PagedKVCache layout, Triton against the torch path
    "dispatch_triton_vs_torch_fp32": (lambda: _dispatch_case(F32), 2e-5),
}


def _run_cases() -> dict[str, float | str]:
    results: dict[str, float | str] = {}
    for name, (case, _) in TRITON_CASES.items():
        try:
            results[name] = case()
        except Exception as error:  # reported per case by the test in the parent process
            results[name] = f"{type(error).__name__}: {error}"
    return results


@pytest.fixture(scope="module")
def interpreter_results() -> dict[str, float | str]:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONWARNINGS="ignore")
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve())], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("case", list(TRITON_CASES))
def test_triton_kernel_matches_reference(case: str, interpreter_results: dict[str, float | str]) -> None:
    error = interpreter_results[case]
    assert not isinstance(error, str), error
    assert error <= TRITON_CASES[case][1], f"{case}: max abs error {error:.3g}"


# ---- torch path and cost description (in process) ---------------------------------------------------------


# bf16 keeps 8 significant bits: each output (a convex mix of values of magnitude <= ~4) is rounded once at the
# end (<= 4 x 2^-8 = 0.016) and the kernels round softmax weights to bf16 before P.V as flash kernels do.
BF16_TOLERANCE = 3e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kernel", [AttentionKernel.TORCH_PADDED, AttentionKernel.CPU_NATIVE_PAGED])
def test_torch_paths_match_reference(kernel: AttentionKernel, dtype: torch.dtype,
                                     monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Decodes and prefill chunks (one with prior context: lower-right causal, no materialised mask) through
    paged_attention's torch and native CPU paths agree with the fp32 reference over the same (rounded) inputs,
    in fp32 and in bf16 (the dtype models serve in)."""
    arch = tiny_arch(q_heads=4, kv_heads=2, head_dim=32, layers=1)
    monkeypatch.setattr(paged, "attention_kernel", lambda device, head_dim, dtype=None: kernel)
    block_size = 4
    cache = PagedKVCache(arch, 16, block_size, dtype, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    cache.key.copy_(torch.randn(cache.key.shape, generator=gen))
    cache.value.copy_(torch.randn(cache.value.shape, generator=gen))
    decodes = [([3, 9], 6), ([4], 0)]
    prefills = [([5, 6, 7], 0, 9), ([8, 10, 11], 5, 6)]
    rows = 2 + 9 + 6
    q = torch.randn(rows, 4, arch.head_dim, generator=gen).to(dtype)
    k = torch.randn(rows, 2, arch.head_dim, generator=gen).to(dtype)
    v = torch.randn(rows, 2, arch.head_dim, generator=gen).to(dtype)
    scale = arch.head_dim**-0.5
    out = paged.paged_attention(0, q, k, v, cache, AttentionBatch.build(decodes, prefills, block_size, q.device), scale)
    assert out.dtype == dtype
    key_cache, value_cache = cache.key[0].float(), cache.value[0].float()
    expected = torch.cat([
        reference_attention(q[0:1], key_cache, value_cache, [3, 9], 7, scale),
        reference_attention(q[1:2], key_cache, value_cache, [4], 1, scale),
        reference_attention(q[2:11], key_cache, value_cache, [5, 6, 7], 9, scale),
        reference_attention(q[11:17], key_cache, value_cache, [8, 10, 11], 11, scale),
    ])  # fmt: skip
    assert (out.float() - expected).abs().max().item() <= (1e-5 if dtype == torch.float32 else BF16_TOLERANCE)


def test_attention_batch_metadata_follows_the_cache_layout() -> None:
    """Slots are block * block_size + offset; tables pad with block 0 past a row's blocks; chunk offsets count rows."""
    batch = AttentionBatch.build([([3, 9], 5), ([4], 0)], [([5, 6], 2, 3)], 4, torch.device("cpu"))
    assert batch.slots.tolist() == [9 * 4 + 1, 4 * 4 + 0, 5 * 4 + 2, 5 * 4 + 3, 6 * 4 + 0]
    assert batch.slots.dtype == torch.int64
    assert batch.decode_block_tables is not None and batch.decode_block_tables.tolist() == [[3, 9], [4, 0]]
    assert batch.decode_lengths is not None and batch.decode_lengths.tolist() == [6, 1]
    assert batch.max_decode_len == 6 and batch.max_prefill_queries == 3
    assert batch.prefill_query_starts is not None and batch.prefill_query_starts.tolist() == [2]
    assert batch.prefill_context_lens is not None and batch.prefill_context_lens.tolist() == [5]
    assert batch.prefill_block_tables is not None and batch.prefill_block_tables.tolist() == [[5, 6]]


def test_decode_cost_follows_the_kernel() -> None:
    """What f_A's decode load counts: Σ contexts for the paged kernels, rows × longest for the padded torch path."""
    assert AttentionKernel.TRITON_PAGED.decode_cost_is_sum_of_contexts
    assert AttentionKernel.CPU_NATIVE_PAGED.decode_cost_is_sum_of_contexts
    assert not AttentionKernel.TORCH_PADDED.decode_cost_is_sum_of_contexts
    assert paged.attention_kernel(torch.device("cpu"), 12) is AttentionKernel.TORCH_PADDED  # native needs D % 32
    cuda = torch.device("cuda")  # only asked, never touched
    assert paged.attention_kernel(cuda, 128, torch.bfloat16) is AttentionKernel.TRITON_PAGED
    assert paged.attention_kernel(cuda, 128, torch.float32) is AttentionKernel.TORCH_PADDED


def test_decode_splits_fill_the_device_without_tiny_splits() -> None:
    from piggyback_runtime.attention.triton_paged import MAX_DECODE_SPLITS, num_decode_splits

    assert num_decode_splits(1, 8, 200, 264) == 1  # too short to split
    assert num_decode_splits(256, 8, 100_000, 264) == 1  # already 2048 programs
    long_single = num_decode_splits(1, 8, 128_000, 264)
    assert long_single == MAX_DECODE_SPLITS
    assert num_decode_splits(4, 8, 2048, 264) == 8  # 2048 / 256 tokens a split, a power of two
    for seqs, length in [(1, 300), (3, 5000), (17, 900)]:
        splits = num_decode_splits(seqs, 8, length, 264)
        assert splits & (splits - 1) == 0 and 1 <= splits <= MAX_DECODE_SPLITS


def test_cpu_tensors_without_the_interpreter_are_refused_clearly() -> None:
    from piggyback_runtime.attention import triton_paged

    if triton_paged._INTERPRETED:
        pytest.skip("this process runs Triton's interpreter")
    key_cache, value_cache = make_cache(2, 4, 1, 16, torch.float32)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        triton_paged.paged_decode_attention(
            torch.zeros(1, 1, 16), key_cache, value_cache, torch.zeros(1, 1, dtype=torch.int32),
            torch.ones(1, dtype=torch.int32), 1.0, 1,
        )  # fmt: skip
    with pytest.raises(ValueError, match="must share"):
        triton_paged.paged_decode_attention(
            torch.zeros(1, 1, 16, dtype=torch.float16), key_cache, value_cache,
            torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32), 1.0, 1,
        )  # fmt: skip


if __name__ == "__main__":
    print(json.dumps(_run_cases()))


# ---- fp8 KV (engine.kv_cache_dtype: fp8_e4m3) ----------------------------------------------------------------------
def test_fp8_kv_is_refused_off_a_gpu_with_fp8_naming_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    from piggyback_runtime.config import ConfigError

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert paged.kv_cache_dtype("auto", cpu, torch.bfloat16) is torch.bfloat16
    with pytest.raises(ConfigError, match=r"engine.kv_cache_dtype fp8_e4m3 needs a CUDA GPU.*device is cpu.*auto"):
        paged.kv_cache_dtype("fp8_e4m3", cpu, torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(ConfigError, match=r"compute capability 8.9 or newer; NVIDIA A100 has 8.0"):
        paged.kv_cache_dtype("fp8_e4m3", cuda, torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # H100
    assert paged.kv_cache_dtype("fp8_e4m3", cuda, torch.bfloat16) is torch.float8_e4m3fn
    with pytest.raises(ConfigError, match=r"bf16 or fp16 model \(model.dtype\)"):
        paged.kv_cache_dtype("fp8_e4m3", cuda, torch.float32)


def test_the_engine_refuses_fp8_kv_on_the_cpu_at_start() -> None:
    from piggyback_runtime.config import ConfigError
    from piggyback_runtime.engine import Engine
    from tests.runtime.helpers import tiny_config

    with pytest.raises(ConfigError, match=r"engine\.kv_cache_dtype fp8_e4m3"):
        Engine(tiny_config(kv_cache_dtype="fp8_e4m3"))


def test_an_fp8_cache_stores_saturated_e4m3_values_and_reads_them_back_scaled(monkeypatch: pytest.MonkeyPatch) -> None:
    """The write and read halves of fp8 KV through paged_attention's torch path (the runtime serves fp8 only on
    a GPU, where the Triton kernels cast each tile the same way; the GPU suite measures the accuracy cost)."""
    arch = tiny_arch(q_heads=4, kv_heads=2, head_dim=32, layers=1)
    monkeypatch.setattr(paged, "attention_kernel", lambda device, head_dim, dtype=None: AttentionKernel.TORCH_PADDED)
    block_size = 4
    cache = PagedKVCache(arch, 16, block_size, torch.float8_e4m3fn, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    cache.key.copy_(torch.randn(cache.key.shape, generator=gen))
    cache.value.copy_(torch.randn(cache.value.shape, generator=gen))
    decodes = [([3, 9], 6), ([4], 0)]
    prefills = [([8, 10, 11], 5, 6)]
    rows = 2 + 6
    q = torch.randn(rows, 4, arch.head_dim, generator=gen).to(torch.bfloat16)
    k = (torch.randn(rows, 2, arch.head_dim, generator=gen) * 3).to(torch.bfloat16)
    v = torch.randn(rows, 2, arch.head_dim, generator=gen).to(torch.bfloat16)
    k[0, 0, 0] = 1000.0  # past e4m3's range: saturates at 448, never inf or NaN
    batch = AttentionBatch.build(decodes, prefills, block_size, q.device)
    out = paged.paged_attention(0, q, k, v, cache, batch, arch.head_dim**-0.5)
    stored_keys = cache.key[0].view(-1, 2, arch.head_dim)[batch.slots].float()
    expected_keys = k.float().clamp(-448, 448).to(torch.float8_e4m3fn).float()
    assert torch.equal(stored_keys, expected_keys) and stored_keys[0, 0, 0].item() == 448.0
    assert ((stored_keys - k.float().clamp(-448, 448)).abs() <= k.float().abs() * 2**-4 + 2**-9).all()
    key_cache, value_cache = cache.key[0].float() * paged.FP8_KV_SCALE, cache.value[0].float() * paged.FP8_KV_SCALE
    scale = arch.head_dim**-0.5
    expected = torch.cat([
        reference_attention(q[0:1], key_cache, value_cache, [3, 9], 7, scale),
        reference_attention(q[1:2], key_cache, value_cache, [4], 1, scale),
        reference_attention(q[2:8], key_cache, value_cache, [8, 10, 11], 11, scale),
    ])  # fmt: skip
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    assert (out.float() - expected).abs().max().item() <= BF16_TOLERANCE
