"""`hybrid`, the default: BE KV in spare HBM (decode at accelerator speed), on the host's CPU path beyond it."""

from __future__ import annotations

from piggyback_runtime.scheduler.policies.base import Policy


class HybridPolicy(Policy):
    """The default. BE prefill on the accelerator at low priority; a BE request's KV stays in HBM (decode on the
    accelerator) while HBM is spare, and lives in host DRAM with its decode attention on the CPUs beyond that.
    "Spare" is the planner's decision: free HBM less the LS KV it forecasts within `engine.hbm_reserve_horizon_s`.
    When LS needs the room, HBM-resident BE requests move to host KV (newest first); when HBM frees up,
    host-resident ones move back. Where the host's DRAM carries all the BE decode the accelerator's prefill feeds,
    every BE decode runs on the host path instead (host-only mode, scheduler/be_mode.py): there HBM-resident decodes
    only take accelerator time from BE prefill. A latency model sizes the token budget and the BE share and admits
    LS requests."""

    name = "hybrid"
    listing_rank = -10
    host_path_classes = frozenset({"BE"})
    slo_controlled = True
    hybrid_placement = True

