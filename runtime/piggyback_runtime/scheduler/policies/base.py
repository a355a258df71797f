"""The `Policy` base class: every decision a policy may make, as one overridable hook each.

Pure Python, no torch and no planner import, so `config.py` can list the policies cheaply. The base class is
the baseline behaviour (`priority`: BE on the accelerator after LS work); a policy overrides only what it
changes. Who asks, and when:

- `BatchScheduler` (scheduler/batching.py), every iteration: `priority` orders running requests and picks
  who is preempted last, `choose_victim` picks who is preempted when accelerator KV runs out, `be_waits_for`
  decides whether BE work sits out the iteration; once at construction, `be_kv_block_limit` caps the
  accelerator KV all BE requests may hold.
- `Planner` (scheduler/planner.py), once at construction: `uses_host_path` (it then needs host KV),
  `slo_controlled` (a latency model sizes the BE share, the token budget and admits LS requests),
  `hybrid_placement` (BE KV in spare HBM, host beyond), `rows_per_layer` (BE rows one layer takes when no
  latency model bounds them); per request: `on_host_path` (decode on the CPU path?); when LS needs HBM:
  `choose_to_host` (which HBM-resident BE requests move to host KV first).
- `ModelRunner` (model_runner.py) and the simulator (sim/simulator.py), every iteration:
  `on_host_path` per chunk and `synchronous_cpu_attention` (the accelerator waits for each layer's CPU
  attention).
- The engine and `kv/sizing.py`, once at start-up: `host_path_classes` (whether to size and start the host
  path at all).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Protocol, TypeVar


class RequestView(Protocol):
    """What a policy reads of a request. A protocol rather than `request.Request` itself: config.py validates
    policy names through this package, so it sits below the request module and may not import it."""

    @property
    def is_ls(self) -> bool: ...

    @property
    def arrival_s(self) -> float: ...


Request = TypeVar("Request", bound=RequestView)


class Policy:
    """How BE work shares the accelerator with LS work. Subclass it in a module of this package."""

    # The name `engine.policy` takes; unique across the package.
    name: ClassVar[str]
    # Where the policy sorts in every listing (help, benchmarks' tables, README): lower first, then by name.
    listing_rank: ClassVar[int] = 100
    # Service classes whose decode runs with KV in host DRAM and attention on CPU workers.
    host_path_classes: ClassVar[frozenset[str]] = frozenset()
    # The accelerator waits for each layer's CPU attention (NEO); the piggyback path never does.
    synchronous_cpu_attention: ClassVar[bool] = False
    # A latency model chooses the BE share per iteration and admits LS requests (needs slo_control.enabled).
    slo_controlled: ClassVar[bool] = False
    # Per-request BE placement (policy `hybrid`): a BE request's KV lives in HBM while the planner finds HBM
    # spare and on the host path beyond it, and moves between the two (the planner asks `choose_to_host`).
    hybrid_placement: ClassVar[bool] = False

    def __init__(self, headroom_be_kv_share: float = 0.3, max_be_requests: int = 256) -> None:
        self.headroom_be_kv_share = headroom_be_kv_share
        self.max_be_requests = max_be_requests

    @classmethod
    def summary(cls) -> str:
        """One line for listings: the class docstring with its line breaks folded."""
        return " ".join((cls.__doc__ or cls.name).split())

    # --- placement: where a request's decode runs -------------------------------------------------------------
    @property
    def uses_host_path(self) -> bool:
        """Whether any service class decodes on the host path (the planner then requires host KV)."""
        return bool(self.host_path_classes)

    def on_host_path(self, service_class: str) -> bool:
        """Whether a request of this class decodes with KV in host DRAM and attention on the CPU workers.
        Asked by the planner at admission and by the model runner and the simulator for every chunk."""
        return service_class in self.host_path_classes

    def choose_to_host(self, candidates: Sequence[Request]) -> list[Request]:
        """(hybrid placement) The order in which HBM-resident BE requests move to host KV when LS needs the
        room; the planner takes them from the front until enough HBM is free. Default: newest first."""
        return sorted(candidates, key=lambda r: r.arrival_s, reverse=True)

    # --- ordering and preemption (BatchScheduler, every iteration) --------------------------------------------
    def priority(self, request: Request) -> tuple[int, float]:
        """Sort key of running requests, lowest first: the scheduler sorts by it at the start of every
        iteration, and only a request with a larger key may be preempted for this one. LS before BE, then
        earlier arrival first."""
        return (0 if request.is_ls else 1, request.arrival_s)

    def choose_victim(self, request: Request, candidates: Sequence[Request]) -> Request:
        """The request to preempt so that `request` gets accelerator KV. `candidates` (never empty) are the
        running requests with a larger `priority` key that hold no chunk this iteration, in the scheduler's
        running order (sorted by `priority`, requests admitted this iteration last). Called until the KV
        fits or no candidate is left. Default: the last one, i.e. the lowest priority."""
        return candidates[-1]

    # --- BE share ------------------------------------------------------------------------------------------------
    def be_waits_for(self, ls_work_held: bool) -> bool:
        """Whether BE work sits out this iteration; asked once per iteration before any BE work is planned,
        with whether any LS request is running or waiting."""
        return False

    def be_kv_block_limit(self, num_blocks: int) -> int | None:
        """Accelerator KV blocks BE requests may hold together, given the cache's `num_blocks`; asked once
        when the scheduler is built. None: no limit beyond the cache itself."""
        return None

    def rows_per_layer(self, configured: int) -> int:
        """BE rows one layer takes when no latency model sets the bound (`configured`:
        piggyback.max_be_rows_per_layer); asked once when the planner is built."""
        return configured
