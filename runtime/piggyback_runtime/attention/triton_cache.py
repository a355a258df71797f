"""Triton's CUDA helper module, compiled when the image is built, for runtime images without a C compiler.

On its first GPU use Triton compiles a small C module (`cuda_utils`, from its `driver.c`) with the system C
compiler and keeps it in its cache, keyed by the source, the platform and the compile arguments (include and
library directories). The runtime image has no compiler, so the image build compiles it into a read-only
directory (``build``, run by the Dockerfile with ``TRITON_LIBCUDA_PATH`` naming a stub libcuda), and
``TRITON_CACHE_MANAGER`` points Triton at `PrebuiltFirstCacheManager`: its usual writable cache first, then the
image's directory. The key matches at run time because ``TRITON_LIBCUDA_PATH`` is the same string in both
stages (the real libcuda.so.1 is found by the dynamic loader when the module is loaded).

    python -m piggyback_runtime.attention.triton_cache /opt/piggyback/triton-cache   # what the Dockerfile runs
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from triton.runtime.cache import FileCacheManager

ENV_PREBUILT = "PIGGYBACK_TRITON_PREBUILT"  # the read-only directory `build` filled at image build time


class PrebuiltFirstCacheManager(FileCacheManager):
    """Triton's file cache, falling back to the image's prebuilt entries for files it does not hold."""

    def __init__(self, key: str, override: bool = False, dump: bool = False) -> None:
        super().__init__(key, override=override, dump=dump)
        root = os.environ.get(ENV_PREBUILT)
        self.prebuilt_dir = Path(root) / key if root and not (override or dump) else None

    def get_file(self, filename: str) -> str | None:
        found = super().get_file(filename)
        if found is None and self.prebuilt_dir is not None and (self.prebuilt_dir / filename).is_file():
            return str(self.prebuilt_dir / filename)
        return found


def build(cache_dir: Path) -> str:
    """Compile Triton's `cuda_utils` into `cache_dir` exactly as Triton would at first use; returns its path.

    Only compiled, not loaded: the build host has no GPU driver. Needs TRITON_LIBCUDA_PATH set to a directory
    holding a libcuda.so.1 to link against (the CUDA toolkit's stub).
    """
    if not os.environ.get("TRITON_LIBCUDA_PATH"):
        raise SystemExit("set TRITON_LIBCUDA_PATH to a directory with libcuda.so.1 (e.g. the CUDA toolkit's stub)")
    os.environ["TRITON_CACHE_DIR"] = str(cache_dir)
    from triton.backends.nvidia import driver
    from triton.runtime.build import compile_so_from_file

    return compile_so_from_file(
        src_path=os.path.join(driver.dirname, "driver.c"), name="cuda_utils", library_dirs=driver.library_dirs(),
        include_dirs=driver.include_dirs, libraries=driver.libraries,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Compile Triton's cuda_utils module into an image's cache.")
    parser.add_argument("cache_dir", type=Path)
    print(build(parser.parse_args(argv).cache_dir))


if __name__ == "__main__":
    main()
