"""`ls-only`: Sarathi-Serve-like, BE only while no LS work is held."""

from __future__ import annotations

from piggyback_runtime.scheduler.policies.base import Policy


class LSOnlyPolicy(Policy):
    """Sarathi-Serve-like: BE on the accelerator only while no LS work is held."""

    name = "ls-only"
    listing_rank = 20

    def be_waits_for(self, ls_work_held: bool) -> bool:
        return ls_work_held
