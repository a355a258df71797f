"""`piggyback`, the product: BE decode attention on host CPUs, BE rows merged into the Dense batch per layer."""

from __future__ import annotations

from piggyback_runtime.scheduler.policies.base import Policy


class PiggybackPolicy(Policy):
    """BE prefill on the accelerator at low priority, BE decode attention on host CPUs against KV in host DRAM,
    BE rows merged into the Dense batch layer by layer; a latency model sizes the BE share per iteration and
    admits LS requests."""

    name = "piggyback"
    listing_rank = 0
    host_path_classes = frozenset({"BE"})
    slo_controlled = True
