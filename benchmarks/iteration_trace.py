"""Which iterations the latency model mispredicts: a summary of a runtime's iteration trace.

A runtime started with PIGGYBACK_ITERATION_TRACE=<file> appends one JSON line per iteration: the shape that ran
(LS/BE prefill tokens, decode rows, BE rows merged, attention loads), the profile's raw prediction for that
shape, the closed-loop corrected prediction (what `piggyback_latency_model_error_ratio` compares) and the
measured seconds. This prints, per correction regime (and LS-carrying vs BE-only), how many iterations ran,
their median measured time, the median measured ÷ profile ratio, and the corrected prediction's error:
mean |error| (the gauge's measure), time-weighted (Σ|predicted − measured| / Σ measured: long iterations, the
ones an SLO budget is about, weigh more) and signed bias. Last, the noise floor: the error left if every
(regime, 2-second window) were predicted with the best constant ratio chosen in hindsight; no per-regime
ratio corrector, however tuned, does better than that on the same iterations.

    python benchmarks/iteration_trace.py TRACE.jsonl [--after-s 10]
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from piggyback_runtime.scheduler.latency_model import REGIMES

FLOOR_WINDOW_S = 2.0


def load(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _errors(rows: Sequence[dict[str, Any]]) -> tuple[float, float, float]:
    """(mean |relative error|, time-weighted error, mean signed relative error) of the corrected predictions."""
    relative = [(r["predicted_s"] - r["measured_s"]) / r["measured_s"] for r in rows]
    weighted = sum(abs(r["predicted_s"] - r["measured_s"]) for r in rows) / sum(r["measured_s"] for r in rows)
    return statistics.mean(abs(e) for e in relative), weighted, statistics.mean(relative)


def noise_floor(rows: Sequence[dict[str, Any]], window_s: float = FLOOR_WINDOW_S) -> float:
    """Mean |relative error| when each (regime, window) gets the median measured ÷ raw ratio of its own
    iterations, chosen in hindsight."""
    if not rows:
        return 0.0
    start = rows[0]["t"]
    groups: dict[tuple[int, int], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(r["regime"], int((r["t"] - start) // window_s))].append(r)
    errors = []
    for group in groups.values():
        ratio = statistics.median(r["measured_s"] / r["raw_s"] for r in group)
        errors += [abs(r["raw_s"] * ratio - r["measured_s"]) / r["measured_s"] for r in group]
    return statistics.mean(errors)


def summarise(rows: Sequence[dict[str, Any]], after_s: float = 10.0) -> str:
    rows = [r for r in rows if r["measured_s"] > 0 and r["raw_s"] > 0]
    if not rows:
        return "no iterations traced"
    start = rows[0]["t"]
    lines = [
        "| regime | LS work | iterations | measured p50 ms | measured ÷ profile p50 | mean abs error | "
        "time-weighted error | bias |",
        "|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple[int, bool], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(r["regime"], r["ls_decode_rows"] + r["ls_prefill_tokens"] > 0)].append(r)
    for (regime, ls), group in sorted(groups.items()):
        mean_abs, weighted, bias = _errors(group)
        ratio = statistics.median(r["measured_s"] / r["raw_s"] for r in group)
        measured = statistics.median(r["measured_s"] for r in group) * 1000
        lines.append(f"| {REGIMES[regime]} | {'yes' if ls else 'no'} | {len(group)} | {measured:.1f} | {ratio:.2f} "
                     f"| {mean_abs:.3f} | {weighted:.3f} | {bias:+.3f} |")  # fmt: skip
    early = [r for r in rows if r["t"] - start <= after_s]
    later = [r for r in rows if r["t"] - start > after_s]
    for name, part in (("all", rows), (f"first {after_s:g}s", early), (f"after {after_s:g}s", later)):
        if part:
            mean_abs, weighted, bias = _errors(part)
            lines.append(f"| {name} | | {len(part)} | | | {mean_abs:.3f} | {weighted:.3f} | {bias:+.3f} |")
    lines += ["", f"noise floor (best constant ratio per regime and {FLOOR_WINDOW_S:g}s window, in hindsight): mean "
              f"abs error {noise_floor(rows):.3f}"]  # fmt: skip
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", type=Path)
    parser.add_argument("--after-s", type=float, default=10.0)
    args = parser.parse_args()
    print(summarise(load(args.trace), args.after_s))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
