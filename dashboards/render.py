"""Render each dashboard's panels from a Prometheus into one PNG per dashboard, as a user would see them.

    python dashboards/render.py --demo                  # start serve + load + Prometheus (dashboards/live.py)
    python dashboards/render.py --prometheus URL --minutes 30 [--namespace NS] [--service S] [--class LS]

Queries run over Prometheus' HTTP API (query_range) with the dashboard variables substituted the way Grafana
does; series whose legend names an SLO or target are drawn as dashed red thresholds, as the Grafana override does.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter

from dashboards.definitions import DASHBOARDS, THRESHOLD_LEGEND_REGEX, Dashboard, Panel
from dashboards.live import LiveStack, live_stack

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "dashboards"
_THRESHOLD = re.compile(THRESHOLD_LEGEND_REGEX)


def substitute(expr: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$(\w+)", lambda m: variables[m.group(1)], expr)


def legend(template: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template).strip() or "value"


def _binary_bytes(value: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(value) >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value:.0f} B"


_FORMATTERS = {
    "percentunit": lambda v, _: f"{v:.0%}",
    "s": lambda v, _: f"{v * 1000:.0f} ms" if abs(v) < 1 else f"{v:.1f} s",
    "bytes": lambda v, _: _binary_bytes(v),
    "reqps": lambda v, _: f"{v:g}/s",
    "ops": lambda v, _: f"{v:g}/s",
}


def _draw_panel(ax: Any, panel: Panel, stack: LiveStack, variables: dict[str, str], start_s: float, end_s: float,
                step_s: float) -> None:  # fmt: skip
    ax.set_title(panel.title, fontsize=10, loc="left")
    drawn = 0
    if panel.kind == "stat":
        lines = []
        for query in panel.queries:
            for series in stack.query(substitute(query.expr, variables), at_s=end_s):
                value = float(series["value"][1])
                shown = _FORMATTERS.get(panel.unit, lambda v, _: f"{v:g}")(value, None) if math.isfinite(value) else "-"
                lines.append(f"{legend(query.legend, series['metric'])}: {shown}")
        ax.axis("off")
        ax.text(0.02, 0.9, "\n".join(lines) or "no data", va="top", fontsize=13, transform=ax.transAxes)
        return
    for query in panel.queries:
        for series in stack.query_range(substitute(query.expr, variables), start_s, end_s, step_s):
            points = [(float(t) - start_s, float(v)) for t, v in series["values"] if math.isfinite(float(v))]
            if not points:
                continue
            name = legend(query.legend, series["metric"])
            style = {"color": "red", "linestyle": "--", "linewidth": 1.5} if _THRESHOLD.match(name) else {}
            ax.plot(*zip(*points, strict=True), label=name, **style)
            drawn += 1
    if drawn:
        ax.legend(fontsize=7, loc="best")
    else:
        ax.text(0.5, 0.5, "no data", ha="center", transform=ax.transAxes)
    if panel.unit in _FORMATTERS:
        ax.yaxis.set_major_formatter(FuncFormatter(_FORMATTERS[panel.unit]))
    ax.set_xlabel("seconds", fontsize=8)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)


def render_dashboard(dashboard: Dashboard, stack: LiveStack, variables: dict[str, str], start_s: float,
                     end_s: float, out_dir: Path) -> Path:  # fmt: skip
    columns = 2
    rows = math.ceil(len(dashboard.panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(14, 3.6 * rows), squeeze=False)
    step_s = max(1.0, (end_s - start_s) / 300)
    for ax, panel in zip(axes.flat, dashboard.panels, strict=False):
        _draw_panel(ax, panel, stack, variables, start_s, end_s, step_s)
    for ax in list(axes.flat)[len(dashboard.panels):]:
        ax.axis("off")
    filters = ", ".join(f"{k}={v}" for k, v in variables.items() if not k.startswith("__"))
    fig.suptitle(f"{dashboard.title}   ({filters})", fontsize=13, x=0.01, ha="left")
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{dashboard.uid}.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def render_all(stack: LiveStack, variables: dict[str, str], start_s: float, end_s: float, out_dir: Path) -> list[Path]:
    return [render_dashboard(d, stack, variables, start_s, end_s, out_dir) for d in DASHBOARDS]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--demo", action="store_true", help="start a runtime under load and Prometheus, then render")
    source.add_argument("--prometheus", help="base URL of a Prometheus that scrapes Piggyback")
    parser.add_argument("--load-s", type=float, default=60.0, help="--demo: seconds of mixed load")
    parser.add_argument("--ttft-slo-ms", type=float, default=250.0, help="--demo: the LS service's TTFT SLO")
    parser.add_argument("--tpot-slo-ms", type=float, default=40.0, help="--demo: the LS service's TPOT SLO")
    parser.add_argument("--be-concurrency", type=int, default=6, help="--demo: BE requests kept in flight")
    parser.add_argument("--minutes", type=float, default=30.0, help="--prometheus: how far back to render")
    parser.add_argument("--namespace", default=".*")
    parser.add_argument("--service", default=".*")
    parser.add_argument("--class", dest="service_class", default=".*")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    variables = {"namespace": args.namespace, "service": args.service, "class": args.service_class}
    if args.demo:
        variables["__rate_interval"] = "15s"  # Grafana's value for 1 s scrapes over a short range
        with live_stack(args.load_s, be_concurrency=args.be_concurrency,
                        slo_ms=(args.ttft_slo_ms, args.tpot_slo_ms)) as stack:
            paths = render_all(stack, variables, stack.load_started_s - 5, time.time(), args.out)
    else:
        variables["__rate_interval"] = "2m"  # four 30 s scrapes
        stack = LiveStack(args.prometheus.rstrip("/"), "", 0.0, 0.0, 0)
        end_s = time.time()
        paths = render_all(stack, variables, end_s - args.minutes * 60, end_s, args.out)
    for path in paths:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
