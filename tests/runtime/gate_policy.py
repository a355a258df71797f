"""A policy for the deterministic fidelity gate (test_fidelity_gate.py), loaded through PIGGYBACK_POLICY_MODULES:
`priority` (BE entirely on the accelerator, no CPU path) with SLO control on, so that the gate covers the SLO
controller's BE prefill share and LS admission without the CPU path's real-time asynchrony."""

from __future__ import annotations

from piggyback_runtime.scheduler.policies.priority import PriorityPolicy


class SLOPriorityGatePolicy(PriorityPolicy):
    """`priority` with the SLO controller sizing BE prefill and admitting LS (the fidelity gate's policy)."""

    name = "gate-slo-priority"
    slo_controlled = True
