"""CPU paged decode attention for BE requests: results match a plain per-request softmax(q K^T) V."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch

from piggyback_runtime.attention import cpu_attention as ca

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
native = pytest.mark.skipif(not ca.native_available(), reason="native CPU attention kernel unavailable")


def make_case(
    lens: list[int],
    q_heads: int,
    kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    seed: int = 0,
    layout: str = "token-major",
) -> tuple[torch.Tensor, ...]:
    """Random q and a paged cache whose blocks are shuffled, with block tables padded by garbage ids.

    layout "head-major" stores the cache the way the runtime's host KV cache does (see `ca.head_major`).
    """
    gen = torch.Generator().manual_seed(seed)
    per_seq = [(n + block_size - 1) // block_size for n in lens]
    num_blocks = sum(per_seq) + 3  # a few blocks nobody owns
    order = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    tables = torch.full((len(lens), max(per_seq) + 2), -7, dtype=torch.int32)  # padding is never read
    start = 0
    for s, n in enumerate(per_seq):
        tables[s, :n] = order[start : start + n]
        start += n
    shape = (num_blocks, block_size, kv_heads, head_dim)
    key_cache = torch.randn(shape, generator=gen).to(dtype)
    value_cache = torch.randn(shape, generator=gen).to(dtype)
    if layout == "head-major":
        key_cache = ca.head_major(key_cache.transpose(1, 2).contiguous())
        value_cache = ca.head_major(value_cache.transpose(1, 2).contiguous())
    query = torch.randn(len(lens), q_heads, head_dim, generator=gen)
    return query, key_cache, value_cache, tables, torch.tensor(lens, dtype=torch.int32)


def reference(query, key_cache, value_cache, tables, lens, scale, p_rounding_bound: bool = False):
    """Per request: gather its pages, softmax(q K^T * scale) V in float64.

    With p_rounding_bound, also returns how far each output element may move when every probability is
    rounded to bf16 (8 significant bits: relative error <= 2^-8) before P.V: out = sum_t p_t v_t / sum_t p_t
    then moves by at most 2^-8 * sum_t p_t |v_t - out| / sum_t p_t.
    """
    num_seqs, q_heads, head_dim = query.shape
    _, block_size, kv_heads, _ = key_cache.shape
    group = q_heads // kv_heads
    out = torch.empty(num_seqs, q_heads, head_dim, dtype=torch.float64)
    bound = torch.empty_like(out)
    for s in range(num_seqs):
        n = int(lens[s])
        pages = tables[s, : (n + block_size - 1) // block_size].long()
        k = key_cache[pages].reshape(-1, kv_heads, head_dim)[:n].double()
        v = value_cache[pages].reshape(-1, kv_heads, head_dim)[:n].double()
        for h in range(q_heads):
            kvh = h // group
            probs = torch.softmax(k[:, kvh] @ query[s, h].double() * scale, dim=0)
            out[s, h] = probs @ v[:, kvh]
            bound[s, h] = 2.0**-8 * (probs @ (v[:, kvh] - out[s, h]).abs())
    return (out, bound) if p_rounding_bound else out


def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)


CASES = [
    # (lens, q_heads, kv_heads, head_dim, block_size)
    pytest.param([1, 2, 17, 16, 33], 8, 8, 128, 16, id="mha-short-lengths"),
    pytest.param([37, 300, 129], 8, 2, 128, 16, id="gqa4-not-block-multiples"),
    pytest.param([100, 5], 32, 4, 64, 8, id="gqa8-block8"),
    pytest.param([250, 31], 4, 4, 96, 32, id="gqa1-dim96-block32"),
    pytest.param([64, 1000], 16, 2, 256, 16, id="gqa8-dim256"),
    pytest.param([3, 70], 6, 1, 128, 16, id="gqa6-mqa"),
    # Blocks of several tiles: a task walks each block kv head by kv head, and the long sequences are
    # split into token ranges that start inside a block (at any thread count: 352, 416 or 608 tokens in).
    pytest.param([1, 64, 65, 700, 1200], 8, 2, 128, 64, id="gqa4-block64"),
    pytest.param([200, 1300], 8, 4, 64, 256, id="gqa2-dim64-block256"),
]


@native
@pytest.mark.parametrize("layout", ["token-major", "head-major"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize(("lens", "q_heads", "kv_heads", "head_dim", "block_size"), CASES)
def test_native_matches_reference(lens, q_heads, kv_heads, head_dim, block_size, dtype, layout):
    case = make_case(lens, q_heads, kv_heads, head_dim, block_size, dtype, layout=layout)
    scale = head_dim**-0.5
    got = ca.paged_decode_attention(*case, scale)
    assert_close(got, reference(*case, scale))


@native
@pytest.mark.parametrize(("lens", "q_heads", "kv_heads", "head_dim", "block_size"), CASES)
def test_bf16_model_query_takes_dot_products_within_the_bf16_rounding_of_p(
    lens, q_heads, kv_heads, head_dim, block_size
):
    # A bf16 model hands over a q whose values are exactly bf16: with bf16 KV the kernel then uses bf16 dot
    # products where the CPU has them. q.K stays exact (a product of two bf16 numbers is exact in fp32, and
    # the sums are fp32). P.V rounds each probability to bf16, as GPU flash attention rounds P before its
    # P.V matmul, and accumulates in fp32: every output element stays within the bound that rounding allows
    # (a wrong token pairing or lane order would be off by far more).
    query, *rest = make_case(lens, q_heads, kv_heads, head_dim, block_size, torch.bfloat16, layout="head-major")
    scale = head_dim**-0.5
    case = (query.to(torch.bfloat16).float(), *rest)
    want, bound = reference(*case, scale, p_rounding_bound=True)
    error = (ca.paged_decode_attention(*case, scale).double() - want).abs()
    assert (error <= 1.01 * bound + 2e-5).all(), f"worst excess {(error - bound).max().item():.3g}"


@native
def test_query_that_is_not_exactly_bf16_takes_the_widening_path_as_exact_as_float32():
    # One q element that is not exactly bf16 sends the whole call down the widen + FMA path.
    lens, q_heads, kv_heads, head_dim, block_size = [37, 300, 129], 8, 2, 128, 16
    query, *rest = make_case(lens, q_heads, kv_heads, head_dim, block_size, torch.bfloat16, layout="head-major")
    query = query.to(torch.bfloat16).float().index_put_((torch.tensor([0]),), torch.tensor(0.1))
    case = (query, *rest)
    assert_close(ca.paged_decode_attention(*case, head_dim**-0.5), reference(*case, head_dim**-0.5))


@native
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_avx2_build_matches_reference(monkeypatch, dtype):
    # The AVX2 code path (8 lanes, 2-head register groups) is what machines without AVX-512 run.
    monkeypatch.setenv(ca.ENV_ISA, "avx2")
    monkeypatch.setattr(ca, "_selected", None)  # the backend is chosen again from the changed environment
    assert ca.kernel_name() == "native-avx2"
    for lens, q_heads, kv_heads, head_dim in [([1, 37, 300], 8, 2, 128), ([5000], 6, 1, 64)]:
        case = make_case(lens, q_heads, kv_heads, head_dim, 16, dtype)
        got = ca.paged_decode_attention(*case, head_dim**-0.5, num_threads=2)
        assert_close(got, reference(*case, head_dim**-0.5))


@native
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_long_sequence_is_split_across_threads_and_merged(dtype):
    # With 2 threads and one kv head, a 5000-token request is cut into several ranges whose partial
    # softmax states are merged by log-sum-exp; large logits make a wrong merge visible.
    query, k, v, tables, lens = make_case([5000, 40], 4, 1, 128, 16, dtype, seed=1)
    scale = 0.5
    got = ca.paged_decode_attention(query, k, v, tables, lens, scale, num_threads=2)
    assert_close(got, reference(query, k, v, tables, lens, scale))
    one_thread = ca.paged_decode_attention(query, k, v, tables, lens, scale, num_threads=1)
    assert_close(one_thread, reference(query, k, v, tables, lens, scale))


@native
def test_out_parameter_is_filled_and_returned():
    case = make_case([20, 9], 8, 2, 64, 16, torch.bfloat16)
    out = torch.full((2, 8, 64), float("nan"))
    got = ca.paged_decode_attention(*case, 0.125, out=out)
    assert got is out
    assert_close(out, reference(*case, 0.125))
    strided = torch.full((8, 2, 64), float("nan")).transpose(0, 1)  # non-contiguous out
    assert ca.paged_decode_attention(*case, 0.125, out=strided) is strided
    assert_close(strided, reference(*case, 0.125))


@native
def test_inputs_the_op_does_not_take_directly_are_converted_not_rejected():
    # The lean path hands tensors straight to the op; what it rejects (int64 tables and lengths, a
    # non-contiguous or bf16 query) is converted by the careful path and gives the same result.
    query, k, v, tables, lens = make_case([20, 70], 8, 2, 64, 16, torch.float32)
    expected = reference(query, k, v, tables, lens, 0.125)
    strided_query = query.transpose(0, 1).contiguous().transpose(0, 1)
    assert not strided_query.is_contiguous()
    got = ca.paged_decode_attention(strided_query, k, v, tables.long(), lens.long(), 0.125)
    assert_close(got, expected)
    bf16_query = query.to(torch.bfloat16)
    assert_close(
        ca.paged_decode_attention(bf16_query, k, v, tables, lens, 0.125),
        reference(bf16_query.float(), k, v, tables, lens, 0.125),
    )


@native
def test_bad_block_ids_and_lengths_raise_instead_of_reading_wild_memory():
    query, k, v, tables, lens = make_case([20], 4, 2, 64, 16, torch.float32)
    bad = tables.clone()
    bad[0, 1] = k.shape[0]
    with pytest.raises(RuntimeError, match="block_tables"):
        ca.paged_decode_attention(query, k, v, bad, lens, 0.1)
    with pytest.raises(RuntimeError, match="context_lens"):
        ca.paged_decode_attention(query, k, v, tables, torch.tensor([0], dtype=torch.int32), 0.1)


@pytest.mark.parametrize("layout", ["token-major", "head-major"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_torch_fallback_gives_the_same_result(monkeypatch, dtype, layout):
    monkeypatch.setenv(ca.ENV_BACKEND, "torch")
    monkeypatch.setattr(ca, "_selected", None)  # the backend is chosen again from the changed environment
    assert ca.kernel_name() == "torch"
    assert not ca.native_available()
    case = make_case([1, 45, 130], 8, 2, 128, 16, dtype, layout=layout)
    assert_close(ca.paged_decode_attention(*case, 0.09), reference(*case, 0.09))


def test_unavailable_native_kernel_warns_and_falls_back(monkeypatch):
    monkeypatch.setattr(ca, "_load", lambda isa=None: None)
    monkeypatch.setattr(ca, "_selected", None)  # the backend is chosen again from the changed environment
    monkeypatch.setattr(ca, "_warned", set())
    monkeypatch.delenv(ca.ENV_BACKEND, raising=False)
    case = make_case([12], 4, 2, 64, 16, torch.float32)
    with pytest.warns(RuntimeWarning, match="fallback"):
        got = ca.paged_decode_attention(*case, 0.1)
    assert_close(got, reference(*case, 0.1))


@pytest.mark.parametrize("layout", ["token-major", "head-major"])
def test_write_kv_stores_new_tokens_at_their_slots_with_dtype_conversion(layout):
    if layout == "head-major":
        key_cache = ca.head_major(torch.zeros(4, 2, 8, 32, dtype=torch.bfloat16))
        value_cache = ca.head_major(torch.zeros(4, 2, 8, 32, dtype=torch.bfloat16))
        assert key_cache.shape == (4, 8, 2, 32) and not key_cache.is_contiguous()
    else:
        key_cache = torch.zeros(4, 8, 2, 32, dtype=torch.bfloat16)
        value_cache = torch.zeros_like(key_cache)
    slots = torch.tensor([0, 13, 31], dtype=torch.int64)  # block 0 off 0, block 1 off 5, block 3 off 7
    key, value = torch.randn(3, 2, 32), torch.randn(3, 2, 32)
    ca.write_kv(key_cache, value_cache, slots, key, value)
    assert torch.equal(key_cache[1, 5], key[1].to(torch.bfloat16))
    assert torch.equal(value_cache[3, 7], value[2].to(torch.bfloat16))
    assert torch.equal(key_cache[0, 0], key[0].to(torch.bfloat16))
    assert int((key_cache != 0).any(dim=(2, 3)).sum()) == 3


def cyclic_case(tokens: int) -> tuple[torch.Tensor, ...]:
    """One request of `tokens` tokens whose block table cycles over 32 pages: long reads, small cache."""
    query, k, v, _, _ = make_case([32 * 16], 8, 8, 128, 16, torch.float32)
    blocks = (tokens + 15) // 16
    tables = (torch.arange(blocks, dtype=torch.int32) % 32).unsqueeze(0)
    return query[:1], k, v, tables, torch.tensor([tokens], dtype=torch.int32)


@native
def test_native_call_releases_the_gil():
    # A Python thread counts while the main thread is inside one long native call. If the call held
    # the GIL, the counter could not move until the call returned.
    probe = 1 << 16
    ca.paged_decode_attention(*cyclic_case(probe), 0.1, num_threads=1)  # warm up
    start = time.perf_counter()
    ca.paged_decode_attention(*cyclic_case(probe), 0.1, num_threads=1)
    per_token_s = (time.perf_counter() - start) / probe
    tokens = min(int(0.5 / per_token_s), 1 << 28)  # one call of about 500 ms

    def ticks_during_one_call(case: tuple[torch.Tensor, ...]) -> tuple[int, float]:
        ticks = 0
        done = threading.Event()

        def count() -> None:
            nonlocal ticks
            while not done.is_set():
                ticks += 1
                time.sleep(0.001)

        thread = threading.Thread(target=count)
        thread.start()
        begin = time.perf_counter()
        ca.paged_decode_attention(*case, 0.1, num_threads=1)
        elapsed = time.perf_counter() - begin
        ticks_during_call = ticks
        done.set()
        thread.join()
        return ticks_during_call, elapsed

    # The probe above ran under whatever load this shared machine had: a call sized from it may come out too
    # short to tell, and then a longer one is made, rather than failing on the machine's speed.
    for _ in range(4):
        ticks_during_call, elapsed = ticks_during_one_call(cyclic_case(tokens))
        if elapsed >= 0.2:
            break
        tokens = min(tokens * 4, 1 << 28)
    assert elapsed >= 0.2, f"a call of {tokens} tokens still took only {elapsed:.2f} s: too short to tell"
    assert ticks_during_call >= 10, f"counter moved {ticks_during_call} times during a {elapsed:.2f} s call"


@native
def test_host_kv_cache_is_head_major_and_the_kernel_reads_it_in_place():
    # The piggyback path's shared host cache: one kv head's slice of a block is contiguous, and the
    # kernel takes the strided view as it is (no copy, no fallback warning).
    import multiprocessing

    from piggyback_runtime.piggyback.worker import SharedBuffers

    buffers = SharedBuffers.allocate(
        num_layers=2, num_blocks=6, block_size=16, kv_heads=2, q_heads=8, head_dim=64, num_slots=2,
        kv_dtype=torch.bfloat16, hold=multiprocessing.RawValue("i", 1),
    )  # fmt: skip
    key_cache, value_cache = buffers.key_cache[1], buffers.value_cache[1]
    assert key_cache.shape == (6, 16, 2, 64)
    assert key_cache.stride() == (2 * 16 * 64, 64, 16 * 64, 1)
    gen = torch.Generator().manual_seed(3)
    slots = torch.arange(40)
    tables = torch.tensor([[4, 0, 2]], dtype=torch.int32)
    flat = (tables[0, slots // 16] * 16 + slots % 16).long()
    key, value = torch.randn(40, 2, 64, generator=gen), torch.randn(40, 2, 64, generator=gen)
    ca.write_kv(key_cache, value_cache, flat, key, value)
    query = torch.randn(1, 8, 64, generator=gen)
    case = (query, key_cache, value_cache, tables, torch.tensor([40], dtype=torch.int32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = ca.paged_decode_attention(*case, 0.125)
    assert_close(got, reference(*case, 0.125))


@native
@pytest.mark.parametrize("num_threads", [1, 2, 3])
def test_read_probe_reads_every_element_of_the_buffer_it_is_given(num_threads):
    # The roofline's bandwidth limit is only honest if the probe touches every byte it counts.
    buf = torch.randint(0, 8, (64 * 4099,)).float()  # small integers: the fp32 sums are exact
    assert ca._backend().stream_read(buf, num_threads) == buf.double().sum().item()
    before = buf.clone()
    assert ca.stream_read_bytes_per_s(repeats=2, num_threads=num_threads, buffer=buf) > 0
    assert torch.equal(buf, before)


@pytest.mark.slow  # a subprocess holds the lock
def test_a_build_lock_left_by_a_killed_build_does_not_block_the_next_one(tmp_path: Path) -> None:
    """torch's build guard is a plain file: a build killed mid-way left it behind and every CPU worker then
    waited on it until its start-up timeout. The OS-held lock is dropped with its dead holder, and the file
    it guards is then known to be stale."""
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, pathlib, sys, time\n"
        f"handle = open({str(tmp_path / 'piggyback.flock')!r}, 'w')\n"
        "fcntl.flock(handle, fcntl.LOCK_EX)\n"
        f"pathlib.Path({str(tmp_path / 'lock')!r}).touch()\n"
        "print('held', flush=True)\n"
        "time.sleep(600)\n"
    )], stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    finally:
        holder.kill()
        holder.wait()
    assert (tmp_path / "lock").exists()
    with ca._build_lock(tmp_path):
        assert not (tmp_path / "lock").exists()
