"""Decode throughput of this engine against Hugging Face `transformers` generate, same model, same run.

Both serve the same requests (same prompts, same requested output lengths) on the same synthetic model:
- transformers: `generate` on static batches of `batch` requests (left-padded); a batch runs until its
  longest request is done, so shorter requests in it waste their rows.
- piggyback: the engine with `max_num_seqs = batch`; a finished request's row is refilled at once.
Reported: useful output tokens/s (tokens the requests asked for) and the ratio. Two workloads: every request
wants the same length (isolates per-step engine cost), and mixed lengths (where continuous batching pays).

    python benchmarks/engine_throughput.py [--model synthetic://small-llama] [--quick]
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch

from piggyback_runtime.config import RuntimeConfig
from piggyback_runtime.engine import Engine
from piggyback_runtime.hardware import describe_device
from piggyback_runtime.model.loader import load_model
from piggyback_runtime.request import Request, SamplingParams

RESULTS = Path(__file__).parent / "results"


def workload(num_requests: int, prompt_len: int, mixed: bool, max_out: int, seed: int) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [
        ([1] + [rng.randrange(10, 500) for _ in range(prompt_len - 1)],
         rng.randint(max_out // 8, max_out) if mixed else max_out)
        for _ in range(num_requests)
    ]  # fmt: skip


def run_hf(hf: torch.nn.Module, requests: list[tuple[list[int], int]], batch: int) -> float:
    started = time.perf_counter()
    for i in range(0, len(requests), batch):
        group = requests[i : i + batch]
        width = max(len(p) for p, _ in group)
        ids = torch.tensor([[0] * (width - len(p)) + p for p, _ in group])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in group])
        longest = max(n for _, n in group)
        with torch.no_grad():
            hf.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=longest,
                min_new_tokens=longest,
                do_sample=False,
                pad_token_id=0,
                eos_token_id=None,
            )
    return time.perf_counter() - started


def run_engine(engine: Engine, requests: list[tuple[list[int], int]]) -> float:
    started = time.perf_counter()
    for i, (prompt, n) in enumerate(requests):
        engine.add_request(
            Request(
                f"r{i}", "bench", "BE", list(prompt), SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
            )
        )
    while engine.has_work():
        engine.step()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="synthetic://small-llama")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--max-out", type=int, default=96)
    parser.add_argument("--quick", action="store_true", help="fewer, shorter requests")
    args = parser.parse_args()
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    batches = [int(b) for b in args.batches.split(",")]
    max_out = 32 if args.quick else args.max_out
    base = {"model": {"uri": args.model}, "device": device, "services": [{"name": "bench", "class": "BE"}]}
    loaded = load_model(RuntimeConfig.from_dict(base).model, device)
    hf_cfg = AutoConfig.for_model(**{k: v for k, v in loaded.arch.to_hf_config().items() if k != "architectures"})
    hf = AutoModelForCausalLM.from_config(hf_cfg, dtype=loaded.dtype).to(device).eval()
    hf.load_state_dict(loaded.model.state_dict(), strict=False)
    print(
        f"model {args.model} on {device} ({torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}), "
        f"{loaded.dtype}, prompt {args.prompt_len} tokens, outputs up to {max_out} tokens"
    )
    rows = []
    for mixed in (False, True):
        for batch in batches:
            num_requests = batch * (1 if args.quick else 2) if batch > 1 else (2 if args.quick else 4)
            requests = workload(num_requests, args.prompt_len, mixed, max_out, seed=batch)
            useful = sum(n for _, n in requests)
            # Policy `priority`: every request on the accelerator, so this measures the engine itself.
            config = RuntimeConfig.from_dict({**base, "engine": {"policy": "priority",
                "max_num_seqs": batch, "max_num_batched_tokens": max(512, batch * args.prompt_len),
                "num_kv_blocks": 2 * batch * (args.prompt_len + max_out) // 16 + 16}})  # fmt: skip
            engine = Engine(config, loaded=loaded)
            run_engine(engine, requests[:1])  # warm-up
            run_hf(hf, requests[:1], 1)
            engine_s = run_engine(engine, requests)
            hf_s = run_hf(hf, requests, batch)
            rows.append(
                ("mixed" if mixed else "equal", batch, num_requests, useful / hf_s, useful / engine_s, hf_s / engine_s)
            )
            print(
                f"  {rows[-1][0]:5} batch {batch:3d}: transformers {useful / hf_s:8.1f} tok/s, "
                f"piggyback {useful / engine_s:8.1f} tok/s, ratio {hf_s / engine_s:5.2f}x",
                flush=True,
            )
    header = (
        f"{'lengths':8} {'batch':>5} {'requests':>8} {'transformers tok/s':>19} {'piggyback tok/s':>16} {'ratio':>7}"
    )
    lines = [header, "-" * len(header)]
    lines += [f"{r[0]:8} {r[1]:5d} {r[2]:8d} {r[3]:19.1f} {r[4]:16.1f} {r[5]:6.2f}x" for r in rows]
    table = "\n".join(lines)
    print("\n" + table)
    RESULTS.mkdir(exist_ok=True)
    where = describe_device(device)
    (RESULTS / "engine_throughput.md").write_text(
        f"# Engine decode throughput vs transformers generate\n\nCommand: `python benchmarks/engine_throughput.py"
        f"{' --quick' if args.quick else ''}`\n\nMachine: {where}; model {args.model}, {loaded.dtype}, prompt "
        f"{args.prompt_len} tokens, outputs up to {max_out} tokens (mixed: uniform from 1/8 of that).\n\n"
        f"```\n{table}\n```\n\n![plot](engine_throughput.png)\n"
    )
    _plot(rows, RESULTS / "engine_throughput.png", f"{args.model} on {where}")
    print(f"\nplot: {RESULTS / 'engine_throughput.png'}")


def _plot(rows: list[tuple], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=False)
    for ax, kind in zip(axes, ("equal", "mixed"), strict=True):
        subset = [r for r in rows if r[0] == kind]
        x = range(len(subset))
        ax.bar([i - 0.2 for i in x], [r[3] for r in subset], width=0.4, label="transformers generate")
        ax.bar([i + 0.2 for i in x], [r[4] for r in subset], width=0.4, label="piggyback engine")
        ax.set_xticks(list(x), [f"batch {r[1]}\n{r[5]:.2f}x" for r in subset])
        ax.set_title(f"{kind} output lengths")
        ax.set_ylabel("useful output tokens/s")
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
