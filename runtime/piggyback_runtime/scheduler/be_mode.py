"""Hybrid placement's two modes, and the rule that picks one: where BE decode attention costs the least GPU time.

Every BE token needs its prompt prefilled on the accelerator. A BE decode in HBM then costs the accelerator its
Dense row and its attention over the context; one on the host path costs only the Dense row, and it rides in two
sub-batches' merge windows when iterations split (`Planner._cpu_rows_ride`). So where the host's DRAM can carry
every BE token the accelerator's prefill can feed, HBM-resident BE decodes only take accelerator time from BE
prefill: the host path should carry them all (**host-only**). Where it cannot, HBM-resident decodes carry what the
host cannot, and spare HBM is filled first (**HBM-first**, the rest of hybrid placement).

Measured in the simulator over 150 s (`benchmarks/regime_map.py --quick --horizon-s 150 --be-count 1000`):
8B-A100 at the middle LS rate, DailyMail-like BE, the host can carry about 1.2× what prefill feeds, and
host-only moves 710 BE tok/s against HBM-first's 611; on 70B-H100x4 it carries about a quarter, and host-only
moves 428 against 1,271. Neither mode wins everywhere, so the planner picks by these figures, from what it
measures (the BE work its iterations carry over their seconds, the BE prompts and max_tokens) and the host's
attention bandwidth, and picks again as they change.
"""

from __future__ import annotations

from dataclasses import dataclass

# Host-only is entered where the host carries at least this many times the BE decode that prefill feeds, and left
# where it carries less than this many: a band around the boundary (1.0), so that a mix near it does not switch
# back and forth (a switch costs the rows' ramp-up on the side they move to, half a minute to minutes).
HOST_ONLY_ENTER_RATIO = 1.1
HOST_ONLY_LEAVE_RATIO = 0.9
# How often the planner picks the mode (seconds on its clock), and the BE prompts it needs to have seen first.
MODE_PERIOD_S = 5.0
MODE_MIN_BE_REQUESTS = 8
# The supply is measured over each period and smoothed with this time constant: over 5 s it swings ±40 % with the
# LS arrivals and the BE prompts' lengths (8B-A100, middle LS rate, in the simulator).
SUPPLY_SMOOTHING_S = 30.0


@dataclass(frozen=True)
class HostPathCapacity:
    """What bounds BE decode on the host path: the KV bytes per second its CPU attention reads (all workers), over
    the KV bytes one row reads per token (its whole context, every layer)."""

    attention_b_s: float
    kv_bytes_per_token: float

    def __post_init__(self) -> None:
        if self.attention_b_s <= 0 or self.kv_bytes_per_token <= 0:
            raise ValueError(f"host path capacity needs positive figures, got attention_b_s={self.attention_b_s}, "
                             f"kv_bytes_per_token={self.kv_bytes_per_token}")  # fmt: skip

    def decode_tokens_s(self, mean_context_tokens: float) -> float:
        """BE tokens per second the host path carries when every row's context is `mean_context_tokens`."""
        return self.attention_b_s / (self.kv_bytes_per_token * max(1.0, mean_context_tokens))


def host_only_mode(host_tokens_s: float, supply_tokens_s: float, host_only_now: bool) -> bool:
    """Whether BE decodes all go to the host path: the host carries the BE decode that prefill feeds
    (`supply_tokens_s`), with the hysteresis band above. No supply (LS takes the accelerator): no change."""
    if supply_tokens_s <= 0:
        return host_only_now
    ratio = host_tokens_s / supply_tokens_s
    return ratio >= HOST_ONLY_LEAVE_RATIO if host_only_now else ratio >= HOST_ONLY_ENTER_RATIO


def be_decode_supply_tokens_s(be_tokens: float, seconds: float, prompt_tokens: float, output_tokens: float) -> float:
    """BE output tokens per second the accelerator feeds: the BE work its iterations carried over `seconds` (BE
    prompt tokens and decode rows in the plans, CPU-path rows merged) per second, times the share of a BE request's
    tokens that are output, o / (p + o). BE decodes in HBM count as work the accelerator would spend on BE prompts
    instead in host-only mode. 0 when nothing ran."""
    if seconds <= 0:
        return 0.0
    return be_tokens / seconds * output_tokens / (prompt_tokens + output_tokens)
