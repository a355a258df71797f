"""CPU paged decode attention for BE requests whose KV cache lives in host DRAM.

The native kernel (``csrc/cpu_attention.cpp``, C++ with AVX2 or AVX-512, its own thread team) is built with
``torch.utils.cpp_extension`` on first use into a cache directory keyed by the source, the compiler
flags, torch's version and the CPU's instruction-set flags, so nothing is compiled at install time.
When it cannot be built (no compiler, no AVX2/FMA/F16C) or ``PIGGYBACK_CPU_ATTENTION=torch`` is set,
a pure-torch implementation is used instead, with a warning that names the reason. The environment is
read at the first call and kept for the life of the process.

The native op releases the GIL and runs on its own thread team, so a BE attention worker thread does
not stall the engine loop.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import math
import os
import shutil
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from piggyback_runtime.attention import prebuilt

__all__ = [
    "cpu_lacks",
    "cxx_compiler",
    "gather_pages",
    "head_major",
    "kernel_name",
    "native_available",
    "native_build_error",
    "paged_decode_attention",
    "paged_decode_attention_torch",
    "stream_read_bytes_per_s",
    "write_kv",
]

log = logging.getLogger(__name__)

ENV_BACKEND = "PIGGYBACK_CPU_ATTENTION"  # "torch" forces the fallback
ENV_ISA = "PIGGYBACK_CPU_ATTENTION_ISA"  # "avx2" builds without AVX-512 even where the CPU has it
_SOURCE = Path(__file__).parent / "csrc" / "cpu_attention.cpp"
_REQUIRED_FLAGS = ("avx2", "fma", "f16c")
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_lock = threading.Lock()
_native: dict[str, Any] = {}  # isa -> the built extension module
_errors: dict[str, str] = {}  # isa -> why the native build is unavailable
_error_details: dict[str, str] = {}  # isa -> the build's whole error output (for the test suite's report)
_warned: set[str] = set()


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "piggyback" / "cpu_attention"


def _ensure_ninja_on_path() -> None:
    # cpp_extension runs `ninja --version`; the pip-installed ninja sits next to the interpreter,
    # which is not on PATH when the venv is used without being activated.
    if shutil.which("ninja"):
        return
    candidates = [Path(sys.executable).parent]
    try:
        import ninja  # type: ignore[import-not-found]

        candidates.insert(0, Path(ninja.BIN_DIR))
    except ImportError:
        pass
    for d in candidates:
        if (d / "ninja").exists():
            os.environ["PATH"] = f"{d}{os.pathsep}{os.environ.get('PATH', '')}"
            return


def _build(isa: str) -> Any:
    flags = _cpu_flags()
    missing = [f for f in _REQUIRED_FLAGS if f not in flags]
    if missing:
        raise RuntimeError(f"CPU lacks {', '.join(missing)}")
    # Kernels compiled with the image (prebuilt.py) come first: a runtime image has no compiler.
    module = prebuilt.load(isa, flags, torch.__version__)
    if module is not None:
        return module
    from torch.utils import cpp_extension

    cflags = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=fast", "-fno-math-errno"]
    if isa == "avx2":
        cflags += ["-mno-avx512f", "-DPB_FORCE_AVX2"]
    relevant = sorted(f for f in flags if f.startswith(("avx", "fma", "f16c", "amx")))
    source_text = _SOURCE.read_text()
    key_src = "\n".join([source_text, " ".join(cflags), torch.__version__, " ".join(relevant)])
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    build_dir = _cache_root() / f"{isa}-{key}"
    build_dir.mkdir(parents=True, exist_ok=True)
    _ensure_ninja_on_path()
    started = time.perf_counter()
    with _build_lock(build_dir):
        # Compile a copy kept in the build directory: torch's build file names the source's path, so two
        # checkouts (or installs) of the same source would otherwise rebuild the shared directory over each other.
        source = build_dir / _SOURCE.name
        if not source.exists() or source.read_text() != source_text:
            source.write_text(source_text)
        module = cpp_extension.load(
            name=f"piggyback_cpu_attention_{isa}_{key}",
            sources=[str(source)],
            extra_cflags=cflags,
            extra_ldflags=["-fopenmp"],
            build_directory=str(build_dir),
            is_python_module=True,
            verbose=False,
        )
    log.info("cpu attention kernel (%s) ready in %.1f s (%s)", isa, time.perf_counter() - started, build_dir)
    return module


@contextlib.contextmanager
def _build_lock(build_dir: Path) -> Iterator[None]:
    """Serialise builds of one kernel across processes with a lock the OS drops when its holder dies.

    torch's own guard is a file (`lock`) that a build killed mid-way leaves behind, and every later process
    then waits on it forever (CPU workers time out at start). Every builder here takes this flock first, so
    a `lock` file found while holding it belongs to a dead build and is removed."""
    with open(build_dir / "piggyback.flock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        stale = build_dir / "lock"
        if stale.exists():
            log.warning("removing a stale build lock left by an interrupted build: %s", stale)
            stale.unlink(missing_ok=True)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _load(isa: str | None = None) -> Any | None:
    """The native op namespace for `isa` ("native" or "avx2"), building it on first use; None if unavailable."""
    isa = isa or os.environ.get(ENV_ISA, "native")
    if isa not in ("native", "avx2"):
        raise ValueError(f"{ENV_ISA} must be 'native' or 'avx2', not {isa!r}")
    if isa in _native:
        return _native[isa]
    if isa in _errors:
        return None
    with _lock:
        if isa in _native or isa in _errors:
            return _native.get(isa)
        try:
            _native[isa] = _build(isa)
        except Exception as exc:  # any build/load failure means: use the torch fallback
            _errors[isa] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc) else ''}"
            _error_details[isa] = f"{type(exc).__name__}: {str(exc).strip()}"
            log.debug("cpu attention native build failed", exc_info=True)
    return _native.get(isa)


# The backend the environment selects, resolved at the first call and then kept: (the native module, or
# None and why not). Reading os.environ costs ~0.7 us per variable here, on a call that runs per layer per
# decode step. Code that changes ENV_BACKEND or ENV_ISA later (tests) resets this to None.
_selected: tuple[Any | None, str | None] | None = None


def _backend() -> Any | None:
    return (_selected or _select_backend())[0]


def _select_backend() -> tuple[Any | None, str | None]:
    global _selected
    if os.environ.get(ENV_BACKEND, "").lower() == "torch":
        _selected = (None, f"{ENV_BACKEND}=torch")
    else:
        ops = _load()
        unavailable = _errors.get(os.environ.get(ENV_ISA, "native"), "native kernel unavailable")
        _selected = (ops, None if ops is not None else unavailable)
    return _selected


def _unsupported_kv(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor) -> str | None:
    """Why the native kernel cannot read this KV cache, or None if it can."""
    if key_cache.dtype not in _SUPPORTED_DTYPES or query.shape[-1] % 32 != 0:
        return f"unsupported dtype {key_cache.dtype} or head_dim {query.shape[-1]} (needs a multiple of 32)"
    if key_cache.stride(-1) != 1 or key_cache.stride() != value_cache.stride() or not key_cache.is_cpu:
        return "KV caches must be host tensors with a contiguous head_dim and the same strides"
    return None


def _fallback_reason(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor) -> str | None:
    """Why this call goes to the torch fallback, or None if the native kernel takes it."""
    ops, why_not = _selected or _select_backend()
    return why_not if ops is None else _unsupported_kv(query, key_cache, value_cache)


def native_available() -> bool:
    """True when the native kernel is built (or buildable now) and not disabled by the environment."""
    return _backend() is not None


def cxx_compiler() -> str | None:
    """The C++ compiler torch.utils.cpp_extension would build with ($CXX, else c++), or None if there is none."""
    return shutil.which(os.environ.get("CXX") or "c++")


def cpu_lacks() -> list[str]:
    """The instruction-set extensions the native kernel needs that this CPU does not have."""
    flags = _cpu_flags()
    return [f for f in _REQUIRED_FLAGS if f not in flags]


def native_build_error() -> str | None:
    """Why the native kernel (for the selected ISA) did not build, with the compiler's output; None if it did."""
    if native_available():
        return None
    isa = os.environ.get(ENV_ISA, "native")
    return _error_details.get(isa) or (_selected[1] if _selected else None) or "native kernel unavailable"


def kernel_name() -> str:
    """Which implementation `paged_decode_attention` uses: "native-avx512", "native-avx2" or "torch"."""
    ops = _backend()
    return f"native-{ops.isa()}" if ops is not None else "torch"


def _warn_fallback(reason: str) -> None:
    if reason in _warned:
        return
    _warned.add(reason)
    warnings.warn(f"piggyback CPU attention uses the slow pure-torch fallback: {reason}", RuntimeWarning, stacklevel=3)


def head_major(storage: torch.Tensor) -> torch.Tensor:
    """Storage [..., blocks, kv_heads, block_size, head_dim] seen as [..., blocks, block_size, kv_heads, head_dim].

    The host KV cache uses this layout: one kv head's slice of a block is a contiguous run, which the
    kernel streams ~10% faster than block_size rows a token apart. Every reader and writer uses the
    logical view, so the layout is a storage detail.
    """
    return storage.transpose(-3, -2)


def write_kv(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
) -> None:
    """Store new tokens' k/v [n, kv_heads, head_dim] at flat slots (block * block_size + offset), any cache strides."""
    block_size = key_cache.shape[1]
    idx = slot_mapping.to(torch.int64)
    blocks, offsets = idx // block_size, idx % block_size
    key_cache[blocks, offsets] = key.to(key_cache.dtype)
    value_cache[blocks, offsets] = value.to(value_cache.dtype)


def gather_pages(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` tokens of one sequence in a paged cache, copied out as [length, kv_heads, head_dim]."""
    block_size, kv_heads, head_dim = cache.shape[1:]
    blocks = block_table[: -(-length // block_size)].to(torch.int64)
    return cache.index_select(0, blocks).reshape(-1, kv_heads, head_dim)[:length]


def paged_decode_attention_torch(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pure-torch reference and fallback: gather each request's pages, softmax(q K^T * scale) V in fp32."""
    num_seqs, hq, d = query.shape
    hkv = key_cache.shape[2]
    g = hq // hkv
    if out is None:
        out = torch.empty(num_seqs, hq, d, dtype=torch.float32)
    lens = context_lens.tolist()
    for s in range(num_seqs):
        n = int(lens[s])
        k = gather_pages(key_cache, block_tables[s], n).float()  # [n, hkv, d]
        v = gather_pages(value_cache, block_tables[s], n).float()
        q = query[s].float().view(hkv, g, d)
        scores = torch.einsum("hgd,nhd->hgn", q, k) * scale
        probs = torch.softmax(scores, dim=-1)
        out[s] = torch.einsum("hgn,nhd->hgd", probs, v).reshape(hq, d)
    return out


def paged_decode_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    num_threads: int | None = None,
) -> torch.Tensor:
    """Decode attention of one new token per sequence over its paged KV cache; returns fp32 [seqs, q_heads, d].

    q head h reads kv head h // (num_q_heads // num_kv_heads). The newest token's k/v must already be
    in the cache (see `write_kv`). Accumulation is fp32 for every cache dtype.
    """
    ops = _backend()
    if ops is not None:
        # The common case, kept lean (it runs per layer per decode step): the op itself checks dtypes,
        # shapes, strides, devices, lengths and every block id before it reads anything. Whatever it
        # rejects takes the careful path below, which converts what it can, falls back to torch for a
        # cache the kernel cannot read, and otherwise raises the op's own error.
        target = torch.empty(query.shape, dtype=torch.float32) if out is None else out
        try:
            ops.paged_decode_attention(
                query, key_cache, value_cache, block_tables, context_lens, float(scale), target,
                torch.get_num_threads() if num_threads is None else num_threads,
            )  # fmt: skip
            return target
        except (RuntimeError, TypeError):  # TypeError: an argument pybind11 cannot convert as it is
            pass

    if query.dim() != 3 or key_cache.dim() != 4:
        raise ValueError("query must be [seqs, q_heads, head_dim] and caches [blocks, block_size, kv_heads, head_dim]")
    num_seqs, hq, d = query.shape
    hkv = key_cache.shape[2]
    if hq % hkv != 0 or key_cache.shape[3] != d:
        raise ValueError(f"incompatible heads/head_dim: query {tuple(query.shape)}, cache {tuple(key_cache.shape)}")
    if out is not None and (out.shape != query.shape or out.dtype != torch.float32):
        raise ValueError("out must be float32 and shaped like query")

    reason = _fallback_reason(query, key_cache, value_cache)
    if reason is not None:
        if reason != f"{ENV_BACKEND}=torch":
            _warn_fallback(reason)
        return paged_decode_attention_torch(query, key_cache, value_cache, block_tables, context_lens, scale, out)

    # Conversions only when needed: this runs once per decode step and .to() alone costs ~1 us.
    q = query if query.dtype == torch.float32 else query.to(torch.float32)
    q = q if q.is_contiguous() else q.contiguous()
    bt = block_tables if block_tables.dtype == torch.int32 else block_tables.to(torch.int32)
    if bt.dim() == 2 and bt.stride(1) != 1:
        bt = bt.contiguous()
    lens = context_lens if context_lens.dtype == torch.int32 else context_lens.to(torch.int32)
    lens = lens if lens.is_contiguous() else lens.contiguous()
    target = out if out is not None and out.is_contiguous() else torch.empty(num_seqs, hq, d, dtype=torch.float32)
    threads = num_threads if num_threads is not None else torch.get_num_threads()
    ops.paged_decode_attention(q, key_cache, value_cache, bt, lens, float(scale), target, int(threads))
    if out is not None and target is not out:
        out.copy_(target)
        return out
    return target


def stream_read_bytes_per_s(
    nbytes: int = 1 << 30, repeats: int = 5, num_threads: int | None = None, buffer: torch.Tensor | None = None
) -> float:
    """Best single-pass read bandwidth over a buffer of `nbytes` (native kernel, else torch.sum).

    Pass a contiguous float32 `buffer` (then `nbytes` is unused) to probe repeatedly: allocating, faulting in
    and freeing a GiB per probe costs far more than the read and leaves the kernel (and the hypervisor) busy.
    """
    buf = torch.ones(max(nbytes // 4, 1024), dtype=torch.float32) if buffer is None else buffer
    ops = _backend()
    threads = num_threads if num_threads is not None else torch.get_num_threads()
    best = math.inf
    for _ in range(repeats + (buffer is None)):  # a fresh buffer's first pass warms its pages and the team
        start = time.perf_counter()
        if ops is not None:
            ops.stream_read(buf, int(threads))
        else:
            buf.sum()
        best = min(best, time.perf_counter() - start)
    return buf.numel() * 4 / best
