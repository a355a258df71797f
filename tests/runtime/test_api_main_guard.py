"""Embedding the engine in a program (the Python API): a program without `if __name__ == "__main__":` gets a
clear error naming that fix, not a bare EOFError from a worker pipe; with the guard the same program works.

CPU attention workers are started with `spawn`, which re-imports the main module in every worker; the
`piggyback` policy starts them, so a tiny model under it is enough to show both cases in a real subprocess.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PROGRAM = """\
from piggyback_runtime.config import RuntimeConfig
from piggyback_runtime.engine import Engine

def main() -> None:
    config = RuntimeConfig.from_dict({
        "model": {"uri": "synthetic://tiny-llama"},
        "device": "cpu",
        "services": [{"name": "batch", "class": "BE"}],
        "engine": {"policy": "piggyback", "num_kv_blocks": 64, "block_size": 4},
        "piggyback": {"num_host_kv_blocks": 16, "host_block_size": 8, "max_be_requests": 2,
                      "num_cpu_workers": 1, "cpu_threads_per_worker": 1},
        "slo_control": {"enabled": False},
    })
    Engine(config).close()
    print("ENGINE STARTED")

"""


def _run(tmp_path: Path, entry: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "embed.py"
    script.write_text(PROGRAM + textwrap.dedent(entry))
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240,
                          cwd=tmp_path)  # fmt: skip


@pytest.mark.slow
def test_a_program_without_a_main_guard_is_told_how_to_fix_it(tmp_path: Path) -> None:
    result = _run(tmp_path, "main()\n")
    assert result.returncode != 0
    assert "ENGINE STARTED" not in result.stdout
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("piggyback_runtime.piggyback.pool.WorkerStartError:"), result.stderr[-2000:]
    assert 'if __name__ == "__main__":' in last_line
    assert str(tmp_path / "embed.py") in last_line and "has no such guard" in last_line
    assert not last_line.startswith("EOFError")


@pytest.mark.slow
def test_the_same_program_with_the_guard_starts_its_workers(tmp_path: Path) -> None:
    result = _run(tmp_path, 'if __name__ == "__main__":\n    main()\n')
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ENGINE STARTED" in result.stdout
