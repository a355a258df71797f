"""Compile the Triton attention kernels ahead of time for A100 (sm_80) and H100/H200 (sm_90), no GPU needed.

For each kernel configuration the runtime launches on Llama-3-8B/70B-shaped models (head_dim 128, GQA groups 4
and 8, block size 16), in bf16 and fp16, Triton compiles to PTX and ptxas to a cubin. `cuobjdump` reads back
registers, stack frame and local memory per thread (ptxas puts register spills there) and static shared memory;
Triton's metadata gives the dynamic shared memory. A configuration fails when it spills (any stack or local
memory), needs more shared memory than a block may have (163 KiB on sm_80, 227 KiB on sm_90), or more registers
than a block of its warps can get.
This catches what Triton's interpreter cannot: lowering errors, bf16 MMA paths, register pressure.

    .venv/bin/python benchmarks/triton_aot.py [--out benchmarks/results/gpu/triton_aot.md]
"""

from __future__ import annotations

import argparse
import datetime
import re
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from piggyback_runtime.attention import triton_paged as tp

ARCHES = (80, 90)
DTYPES = ("bf16", "fp16")
SHARED_MEMORY_PER_BLOCK_BYTES = {80: 163 * 1024, 90: 227 * 1024}
REGISTERS_PER_SM = 65536
HEAD_DIM = 128
KV_BLOCK_SIZE = 16
ALIGNED = [["tt.divisibility", 16]]  # what Triton's JIT infers for torch allocations and strides of 16 elements


@dataclass(frozen=True, eq=False)  # hashed by identity: compile_config caches per configuration object
class KernelConfig:
    name: str
    kernel: Callable[..., object]
    signature: Callable[[str], dict[str, str]]  # dtype -> argument types
    constexprs: dict[str, int]
    aligned_args: tuple[str, ...]
    num_warps: int
    num_stages: int


def _decode_signature(dtype: str) -> dict[str, str]:
    return {
        "q_ptr": f"*{dtype}", "key_cache_ptr": f"*{dtype}", "value_cache_ptr": f"*{dtype}",
        "block_tables_ptr": "*i32", "context_lens_ptr": "*i32",
        "out_ptr": f"*{dtype}", "partial_out_ptr": "*fp32", "partial_lse_ptr": "*fp32",
        "scale_log2": "fp32",
        "stride_q_token": "i32", "stride_q_head": "i32",
        "stride_kv_block": "i32", "stride_kv_slot": "i32", "stride_kv_head": "i32",
        "stride_table_row": "i32", "stride_out_token": "i32", "stride_out_head": "i32",
    }  # fmt: skip


def _merge_signature(dtype: str) -> dict[str, str]:
    return {
        "partial_out_ptr": "*fp32", "partial_lse_ptr": "*fp32", "out_ptr": f"*{dtype}",
        "stride_out_token": "i32", "stride_out_head": "i32",
    }  # fmt: skip


def _prefill_signature(dtype: str) -> dict[str, str]:
    return {
        "q_ptr": f"*{dtype}", "key_cache_ptr": f"*{dtype}", "value_cache_ptr": f"*{dtype}",
        "block_tables_ptr": "*i32", "query_starts_ptr": "*i32", "query_counts_ptr": "*i32",
        "context_lens_ptr": "*i32", "out_ptr": f"*{dtype}", "key_tiles_ptr": "*i32", "scale_log2": "fp32",
        "stride_q_token": "i32", "stride_q_head": "i32",
        "stride_kv_block": "i32", "stride_kv_slot": "i32", "stride_kv_head": "i32",
        "stride_table_row": "i32", "stride_out_token": "i32", "stride_out_head": "i32",
    }  # fmt: skip


_POINTERS_AND_STRIDES = (
    "q_ptr", "key_cache_ptr", "value_cache_ptr", "out_ptr", "partial_out_ptr", "stride_q_token", "stride_q_head",
    "stride_kv_block", "stride_kv_slot", "stride_kv_head", "stride_out_token", "stride_out_head",
)  # fmt: skip


def _decode(group: int, splits: int) -> KernelConfig:
    config = tp.DEFAULT_DECODE_CONFIG
    return KernelConfig(
        name=f"decode g{group} splits{splits} n{config.block_n}",
        kernel=tp._paged_decode_kernel,
        signature=_decode_signature,
        constexprs=dict(
            GROUP_SIZE=group,
            BLOCK_G=tp.group_block(group),
            HEAD_DIM=HEAD_DIM,
            BLOCK_D=tp.head_dim_block(HEAD_DIM),
            BLOCK_N=config.block_n,
            KV_BLOCK_SIZE=KV_BLOCK_SIZE,
            NUM_SPLITS=splits,
            EXACT_FP32=False,
        ),
        aligned_args=_POINTERS_AND_STRIDES,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )


def _merge(splits: int) -> KernelConfig:
    return KernelConfig(
        name=f"merge splits{splits}",
        kernel=tp._merge_splits_kernel,
        signature=_merge_signature,
        constexprs=dict(HEAD_DIM=HEAD_DIM, BLOCK_D=tp.head_dim_block(HEAD_DIM), NUM_SPLITS=splits),
        aligned_args=("partial_out_ptr", "partial_lse_ptr", "out_ptr", "stride_out_token", "stride_out_head"),
        num_warps=4,
        num_stages=1,
    )


def _prefill(group: int, config: tp.PrefillConfig) -> KernelConfig:
    return KernelConfig(
        name=f"prefill g{group} rows{config.block_rows} n{config.block_n}",
        kernel=tp._paged_prefill_kernel,
        signature=_prefill_signature,
        constexprs=dict(
            GROUP_SIZE=group,
            BLOCK_G=triton.next_power_of_2(group),
            BLOCK_M=tp.prefill_block_m(config, group),
            HEAD_DIM=HEAD_DIM,
            BLOCK_D=tp.head_dim_block(HEAD_DIM),
            BLOCK_N=config.block_n,
            KV_BLOCK_SIZE=KV_BLOCK_SIZE,
            EXACT_FP32=False,
            COUNT_KEY_TILES=False,
        ),
        aligned_args=_POINTERS_AND_STRIDES,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )


# What the runtime launches: the default tile configs, GQA groups of Llama-3-8B (4) and -70B (8), one split
# (direct output) and the most splits (partials), and the merge for the most splits.
CONFIGS: tuple[KernelConfig, ...] = (
    _decode(4, 1),
    _decode(8, tp.MAX_DECODE_SPLITS),
    _merge(tp.MAX_DECODE_SPLITS),
    _prefill(4, tp.DEFAULT_PREFILL_CONFIG),
    _prefill(8, tp.DEFAULT_PREFILL_CONFIG),
)


@dataclass(frozen=True)
class CompileReport:
    kernel: str
    arch: int
    dtype: str
    num_warps: int
    registers: int  # per thread
    spill_bytes: int  # per thread: stack frame plus local memory (ptxas puts register spills there)
    shared_bytes: int  # per block: Triton's dynamic shared memory plus static
    compile_s: float

    @property
    def shared_budget_bytes(self) -> int:
        return SHARED_MEMORY_PER_BLOCK_BYTES[self.arch]

    def problems(self) -> list[str]:
        """Why this configuration would not run well (or at all) on its target; empty when it is fine."""
        found = []
        if self.spill_bytes:
            found.append(f"{self.spill_bytes} B of stack/local memory per thread (register spills)")
        if self.shared_bytes > self.shared_budget_bytes:
            found.append(
                f"{self.shared_bytes} B shared memory > {self.shared_budget_bytes} B per block on sm_{self.arch}"
            )
        if self.registers * self.num_warps * 32 > REGISTERS_PER_SM:
            found.append(f"{self.registers} registers × {self.num_warps * 32} threads > {REGISTERS_PER_SM} per SM")
        return found


def _cuobjdump() -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def resource_usage(cubin: bytes) -> dict[str, int]:
    """REG, SHARED, LOCAL, ... of the one function in a cubin, as cuobjdump reports them."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        text = subprocess.run(
            [_cuobjdump(), "--dump-resource-usage", file.name], capture_output=True, text=True, check=True
        ).stdout
    line = next(line for line in text.splitlines() if "REG:" in line)
    return {key: int(value) for key, value in re.findall(r"(\w+):(\d+)", line)}


@cache
def compile_config(config: KernelConfig, arch: int, dtype: str) -> CompileReport:
    import time

    signature = config.signature(dtype)
    signature.update({name: "constexpr" for name in config.constexprs})
    arg_names = config.kernel.arg_names  # type: ignore[attr-defined]
    attrs = {(arg_names.index(name),): ALIGNED for name in config.aligned_args if name in signature}
    source = ASTSource(fn=config.kernel, signature=signature, constexprs=config.constexprs, attrs=attrs)
    started = time.perf_counter()
    compiled = triton.compile(
        source,
        target=GPUTarget("cuda", arch, 32),
        # FMA contraction on, as Triton 3.9's JIT does by default (said explicitly: the default is changing)
        options={"num_warps": config.num_warps, "num_stages": config.num_stages, "enable_fp_fusion": True},
    )
    elapsed = time.perf_counter() - started
    usage = resource_usage(compiled.asm["cubin"])
    return CompileReport(
        kernel=config.name,
        arch=arch,
        dtype=dtype,
        num_warps=config.num_warps,
        registers=usage["REG"],
        spill_bytes=usage["STACK"] + usage["LOCAL"],
        shared_bytes=compiled.metadata.shared + usage["SHARED"],
        compile_s=elapsed,
    )


def compile_all() -> list[CompileReport]:
    return [compile_config(c, arch, dtype) for c in CONFIGS for arch in ARCHES for dtype in DTYPES]


def markdown_table(reports: list[CompileReport]) -> str:
    lines = [
        "| kernel | arch | dtype | warps | registers/thread | stack+local B/thread (spills) | shared B/block "
        "| budget B | ok |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        ok = "yes" if not r.problems() else "NO: " + "; ".join(r.problems())
        lines.append(
            f"| {r.kernel} | sm_{r.arch} | {r.dtype} | {r.num_warps} | {r.registers} | {r.spill_bytes} | "
            f"{r.shared_bytes} | {r.shared_budget_bytes} | {ok} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "gpu" / "triton_aot.md")
    args = parser.parse_args()
    reports = compile_all()
    table = markdown_table(reports)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    header = (
        f"# Triton attention kernels compiled ahead of time\n\n"
        f"{datetime.date.today().isoformat()}, triton {triton.__version__}, no GPU: PTX by Triton, cubin by "
        f"ptxas, resources by cuobjdump. Head dim {HEAD_DIM}, KV block size {KV_BLOCK_SIZE}.\n\n"
    )
    args.out.write_text(header + table + "\n")
    failed = [r for r in reports if r.problems()]
    if failed:
        raise SystemExit(f"{len(failed)} configuration(s) over budget; see the table")


if __name__ == "__main__":
    main()
