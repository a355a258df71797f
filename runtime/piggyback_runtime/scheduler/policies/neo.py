"""`neo`: NEO-like, decode attention of every request on the CPU, the accelerator waiting per layer."""

from __future__ import annotations

from piggyback_runtime.scheduler.policies.base import Policy


class NeoPolicy(Policy):
    """NEO-like: decode attention of every request on the CPU, the accelerator waiting for it layer by layer."""

    name = "neo"
    listing_rank = 40
    host_path_classes = frozenset({"LS", "BE"})
    synchronous_cpu_attention = True

    def rows_per_layer(self, configured: int) -> int:
        return self.max_be_requests  # the accelerator waits anyway: every decoding row joins every layer
