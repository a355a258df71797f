"""CPU attention kernels compiled when the image is built, so a runtime pod without a compiler still gets them.

An image has no compiler and runs on whatever x86 node the scheduler picks, so `-march=native` at image build
time is wrong twice over. The image instead builds one variant per instruction-set level (portable
`-march=x86-64-v3` / `-v4` flags) into a directory named by ``PIGGYBACK_CPU_ATTENTION_PREBUILT``, next to a
manifest recording the torch version and the kernel source's hash. At first use the loader picks the fastest
variant this CPU can run; when the manifest does not match (another torch, an edited kernel) or no variant
fits, it returns None and cpu_attention.py goes on to its JIT build (then to the torch fallback).

    python -m piggyback_runtime.attention.prebuilt /opt/piggyback/cpu-attention   # what the Dockerfile runs
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

ENV_PREBUILT = "PIGGYBACK_CPU_ATTENTION_PREBUILT"  # the directory docker/'s build step fills
MANIFEST = "manifest.json"
SOURCE = Path(__file__).parent / "csrc" / "cpu_attention.cpp"
_COMMON_CFLAGS = ["-O3", "-fopenmp", "-ffp-contract=fast", "-fno-math-errno"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Variant:
    name: str  # also what the built op's isa() reports
    cflags: tuple[str, ...]
    cpu_flags: tuple[str, ...]  # /proc/cpuinfo flags the code needs; checked before loading (else SIGILL)


# Fastest first: the loader takes the first one the CPU supports.
VARIANTS = (
    Variant("avx512", ("-march=x86-64-v4", "-mavx512bf16"),
            ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd", "avx512_bf16")),
    Variant("avx512", ("-march=x86-64-v4",), ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq",
                                              "avx512cd")),
    Variant("avx2", ("-march=x86-64-v3", "-DPB_FORCE_AVX2"), ("avx2", "fma", "f16c")),
)  # fmt: skip


def variant_key(variant: Variant) -> str:
    """A directory and module name per variant (two share the name avx512; their flags differ)."""
    return f"{variant.name}_{hashlib.sha256(' '.join(variant.cflags).encode()).hexdigest()[:8]}"


def source_sha256() -> str:
    return hashlib.sha256(SOURCE.read_bytes()).hexdigest()


def choose(manifest: dict, cpu_flags: set[str], isa: str) -> dict | None:
    """The manifest entry to load on a CPU with `cpu_flags`; `isa` "avx2" skips the AVX-512 variants."""
    for entry in manifest.get("variants", []):
        if isa == "avx2" and entry["isa"] != "avx2":
            continue
        if set(entry["cpu_flags"]) <= cpu_flags:
            return entry
    return None


def load(isa: str, cpu_flags: set[str], torch_version: str) -> ModuleType | None:
    """The prebuilt op module for this CPU, or None (no directory configured, stale manifest, nothing fits)."""
    root = os.environ.get(ENV_PREBUILT)
    if not root:
        return None
    try:
        manifest = json.loads((Path(root) / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        log.warning("%s=%s has no readable %s (%s); building the CPU attention kernel", ENV_PREBUILT, root,
                    MANIFEST, exc)
        return None
    if manifest.get("torch") != torch_version or manifest.get("source_sha256") != source_sha256():
        log.warning("prebuilt CPU attention kernels in %s were built for torch %s or another kernel source than "
                    "this torch %s; building", root, manifest.get("torch"), torch_version)
        return None
    entry = choose(manifest, cpu_flags, isa)
    if entry is None:
        return None
    spec = importlib.util.spec_from_file_location(entry["module"], Path(root) / entry["file"])
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    log.info("cpu attention kernel (%s) loaded prebuilt from %s", entry["isa"], root)
    return module


def _build_one(variant: Variant, out_dir: Path) -> Path:
    """Compile one variant with torch.utils.cpp_extension in a child process and return the .so's path.

    A child: cpp_extension.load also imports the module, which may use instructions this build host lacks.
    """
    key = variant_key(variant)
    build_dir = out_dir / key
    build_dir.mkdir(parents=True, exist_ok=True)
    module = f"piggyback_cpu_attention_prebuilt_{key}"
    script = (
        "from torch.utils import cpp_extension\n"
        f"cpp_extension.load(name={module!r}, sources=[{str(SOURCE)!r}], extra_cflags={list(variant.cflags)!r}"
        f" + {_COMMON_CFLAGS!r}, extra_ldflags=['-fopenmp'], build_directory={str(build_dir)!r},"
        " is_python_module=True, verbose=False)\n"
    )
    # cpp_extension runs `ninja`; pip puts it next to the interpreter, which need not be on PATH.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    built = build_dir / f"{module}.so"
    built.unlink(missing_ok=True)  # a file left from an earlier build must not pass for this one
    subprocess.run([sys.executable, "-c", script], check=False, env=env)  # the import may fail; the file counts
    if not built.exists():
        raise RuntimeError(f"building the {variant.name} CPU attention kernel ({' '.join(variant.cflags)}) failed")
    for leftover in build_dir.iterdir():  # object files and the ninja file are not needed at run time
        if leftover != built:
            leftover.unlink()
    return built


def build_all(out_dir: Path) -> dict:
    """Build every variant into `out_dir` and write its manifest; returns the manifest."""
    import torch

    out_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for variant in VARIANTS:
        built = _build_one(variant, out_dir)
        entries.append({"isa": variant.name, "cflags": list(variant.cflags), "cpu_flags": list(variant.cpu_flags),
                        "module": built.stem, "file": str(built.relative_to(out_dir))})
    manifest = {"torch": torch.__version__, "source_sha256": source_sha256(), "variants": entries}
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the CPU attention kernel variants for an image.")
    parser.add_argument("out_dir", type=Path, help=f"the directory the runtime reads through {ENV_PREBUILT}")
    manifest = build_all(parser.parse_args(argv).out_dir)
    print(json.dumps(manifest, indent=2))


if __name__ == "__main__":
    main()
