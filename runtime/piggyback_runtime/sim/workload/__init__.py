"""Request streams for the discrete-event simulator: synthetic arrival processes, length models and traces.

spec.py: the WorkloadSpec and SimRequest; generators.py: arrivals, lengths and `generate`; traces.py: trace
files in and out. The kinds, length models, trace format and determinism rules are described there.

Pure Python (stdlib random, csv, json, math, hashlib) plus pydantic for the spec: no torch / numpy / pandas.

A `WorkloadSpec` (YAML keys = field names, units in the names, `class` the only alias) is a seed, a horizon
`duration_s` and a list of sources; `generate(spec)` turns it into one list of `SimRequest`s sorted by arrival.

    seed: 0
    duration_s: 600
    sources:
      - kind: poisson | bursty | diurnal | batch | trace
        service: chat            # (trace: default for rows without a service column)
        class: LS                # LS | BE (trace: default for rows without a class column)
        start_s: 0               # the source starts here (trace: added to the trace's own arrivals)
        duration_s: 300          # optional: the source stops at start_s + duration_s (else at the horizon)
        seed: 0                  # optional offset: a different stream for this source only
        ...kind-specific fields (generators.py; traces.py for kind: trace)
"""

from piggyback_runtime.sim.workload.generators import LengthSampler, generate, length_sampler
from piggyback_runtime.sim.workload.spec import (
    PRESETS,
    BatchSource,
    BurstySource,
    DiurnalSource,
    FixedLengths,
    LengthsSpec,
    LognormalLengths,
    PoissonSource,
    PresetLengths,
    SimRequest,
    SourceSpec,
    TraceSource,
    WorkloadSpec,
    load_workload,
)
from piggyback_runtime.sim.workload.traces import read_trace, write_trace_csv, write_trace_jsonl

__all__ = [
    "PRESETS",
    "BatchSource",
    "BurstySource",
    "DiurnalSource",
    "FixedLengths",
    "LengthSampler",
    "LengthsSpec",
    "LognormalLengths",
    "PoissonSource",
    "PresetLengths",
    "SimRequest",
    "SourceSpec",
    "TraceSource",
    "WorkloadSpec",
    "generate",
    "length_sampler",
    "load_workload",
    "read_trace",
    "write_trace_csv",
    "write_trace_jsonl",
]
