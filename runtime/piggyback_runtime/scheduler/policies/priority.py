"""`priority`: the base behaviour, BE entirely on the accelerator after all LS work."""

from __future__ import annotations

from piggyback_runtime.scheduler.policies.base import Policy


class PriorityPolicy(Policy):
    """BE entirely on the accelerator, after all LS work in the same token budget."""

    name = "priority"
    listing_rank = 10
