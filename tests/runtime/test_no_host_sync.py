"""The forward step never makes the host wait for the device: no device value is read inside it.

The engine runs with its model, KV cache and BE residual store on the `meta` device, where tensors have
shapes but no data: reading a value (.item(), .tolist(), bool(), .cpu(), a device-to-host copy) raises. On
top of that, `SyncGuard` fails the step on the transfers that block on a GPU even though meta lets them
through: a host-to-device copy made with non_blocking=False, `torch.tensor(..., device=<the device>)`, a
Python list used as an index, and an op mixing host and device tensors (an implicit blocking copy).
The one read allowed is the sampled token ids, once per iteration, through `ModelRunner._read_tokens`;
the tests replace it with a reader that checks what it is handed and returns made-up tokens (meta has
no real ones).

The guard also counts the host-to-device copies of every iteration by phase: the step's own metadata
(token ids, positions, attention metadata, BE rows) must go up in exactly one copy; the sampling
parameters in one more at the end; BE results in two per merge (their indices, their results window).

The CPU attention workers are real processes: on meta the q/k/v they receive are zeros (there is nothing
to copy down), which is enough to drive every BE state through the merge.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch.nn.attention.bias import CausalBias
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from piggyback_runtime.engine import Engine
from piggyback_runtime.model.loader import load_model
from piggyback_runtime.request import SamplingParams
from piggyback_runtime.staging import HostStaging
from tests.runtime.helpers import make_request, tiny_config
from tests.runtime.split_plans import SplitPlans

DEVICE = torch.device("meta")


class HostSyncError(AssertionError):
    pass


_READS = {"item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "__array__"}


def _device_argument(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.device | None:
    for value in (*args, kwargs.get("device")):
        if isinstance(value, (str, torch.device)):
            return torch.device(value)
    return None


class SyncGuard(TorchFunctionMode):
    """Fails on every operation that would make the host wait for `device` (see the module docstring).

    A function-level mode (a dispatch-level one breaks tensor subclasses such as SDPA's CausalBias); what
    happens inside an op, such as a data-dependent output size, the meta device itself refuses.
    """

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device_type = device.type
        self.violations: list[str] = []
        self.phase = STEP  # what is running, set by `run_guarded`: each upload is counted under it
        self.uploads: list[str] = []  # the phase of every host-to-device copy, in order

    def _fail(self, message: str) -> None:
        self.violations.append(message)  # kept even if some caller swallowed the exception
        raise HostSyncError(message)

    def _on_device(self, value: Any) -> bool:
        return isinstance(value, torch.Tensor) and value.device.type == self.device_type

    def _is_device(self, target: torch.device | None) -> bool:
        return target is not None and target.type == self.device_type

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        source = args[0] if args else None
        blocking = not kwargs.get("non_blocking", False)
        if name in _READS and self._on_device(source):
            self._fail(f"a device value read on the host (Tensor.{name})")
        if name in ("tensor", "as_tensor", "asarray") and self._is_device(_device_argument(args[1:], kwargs)):
            self._fail(f"torch.{name}(..., device=...) uploads from pageable memory with a blocking copy")
        if name == "to" and isinstance(source, torch.Tensor):
            target = _device_argument(args[1:], kwargs)
            if self._on_device(source) and target is not None and target.type == "cpu":
                self._fail("a device-to-host copy (Tensor.to('cpu'))")
            if not self._on_device(source) and self._is_device(target):
                if blocking:
                    self._fail(f"a blocking host-to-device copy of a {tuple(source.shape)} tensor")
                self.uploads.append(self.phase)
        if name == "copy_":
            destination, origin = args[0], args[1]
            if self._on_device(origin) and not self._on_device(destination):
                self._fail("a device-to-host copy_ into a host tensor")
            if self._on_device(destination) and not self._on_device(origin):
                if blocking and len(args) < 3:
                    self._fail("a blocking host-to-device copy_")
                self.uploads.append(self.phase)
        indexing = name in ("__getitem__", "__setitem__", "index_put_") and self._on_device(source)
        if indexing and any(isinstance(i, list) for i in tree_leaves(args[1], is_leaf=lambda x: isinstance(x, list))):
            self._fail(f"Tensor.{name} with a Python list index (uploaded with a blocking copy)")
        # SDPA's CausalBias is a data-less description of a mask (it lives on the host by construction).
        host = [t for t in tensors if t.device.type == "cpu" and t.dim() and not isinstance(t, CausalBias)]
        mixed = bool(host) and any(self._on_device(t) for t in tensors)
        if mixed and name not in ("to", "copy_"):
            self._fail(f"{name} mixes host and device tensors (an implicit blocking copy)")
        return func(*args, **kwargs)


def meta_engine(policy: str, **piggyback: Any) -> Engine:
    config = tiny_config(policy=policy, max_num_batched_tokens=16, piggyback=piggyback,
                         slo_control={"enabled": False})  # fmt: skip
    loaded = load_model(config.model, "cpu")
    on_meta = dataclasses.replace(loaded, model=loaded.model.to(DEVICE), device=DEVICE)
    return Engine(config, loaded=on_meta)


@dataclasses.dataclass
class TokenReads:
    calls: int = 0
    tokens: int = 0


def fake_token_reads(engine: Engine) -> TokenReads:
    """Replace the one allowed read: check it gets a device tensor of ids, hand back made-up tokens."""
    reads = TokenReads()

    def read(token_ids: torch.Tensor) -> list[int]:
        assert token_ids.device.type == DEVICE.type and token_ids.dtype == torch.long and token_ids.dim() == 1
        reads.calls += 1
        reads.tokens += token_ids.shape[0]
        return [3 + (reads.calls + i) % 50 for i in range(token_ids.shape[0])]

    engine.runner._read_tokens = read  # type: ignore[method-assign]
    return reads


STEP, BE_MERGE, SAMPLING = "step", "BE merge", "sampling"  # upload phases of a forward pass


@dataclasses.dataclass
class Pass:
    """One forward pass as the guard saw it."""

    sampled: bool = False  # some row sampled a token (a pass that only prefills part of a prompt does not)
    merges: int = 0  # PiggybackPath.take calls: layers at which READY BE rows joined
    uploads: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)  # phase -> copies


def _in_phase(guard: SyncGuard, phase: str, func: Callable[..., Any], on_call: Callable[[], None] = lambda: None):
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        on_call()
        outer, guard.phase = guard.phase, phase
        try:
            return func(*args, **kwargs)
        finally:
            guard.phase = outer

    return wrapped


def run_guarded(engine: Engine, max_steps: int = 2_000) -> tuple[list[Pass], SyncGuard]:
    """Step the engine to completion with the guard on; returns what each forward pass did and the guard."""
    guard = SyncGuard(DEVICE)
    passes: list[Pass] = []
    runner = engine.runner
    real_run = runner.run

    def counted_run(*args: Any, **kwargs: Any):  # type: ignore[no-untyped-def]
        passes.append(Pass())
        first_upload = len(guard.uploads)
        result = real_run(*args, **kwargs)
        passes[-1].sampled = bool(result.requests)
        passes[-1].uploads.update(guard.uploads[first_upload:])
        return result

    def count_merge() -> None:
        passes[-1].merges += 1

    runner.run = counted_run  # type: ignore[method-assign]
    runner._sample = _in_phase(guard, SAMPLING, runner._sample)  # type: ignore[method-assign]
    pb = runner.piggyback
    if pb is not None:
        pb.take = _in_phase(guard, BE_MERGE, pb.take, count_merge)  # type: ignore[method-assign]
    with guard:
        for _ in range(max_steps):
            if not engine.has_work():
                break
            engine.step()
    assert not engine.has_work(), "the engine did not finish"
    return passes, guard


def assert_one_upload_per_step(passes: list[Pass]) -> None:
    """Each pass uploads its metadata once, its sampling parameters once if it samples, BE results per merge."""
    for index, forward in enumerate(passes):
        assert forward.uploads[STEP] == 1, (
            f"pass {index} made {forward.uploads[STEP]} host-to-device copies outside sampling and BE merges; "
            "the per-iteration metadata (token ids, positions, attention metadata, BE rows) must go up in one"
        )
        assert forward.uploads[SAMPLING] == int(forward.sampled), f"pass {index}: sampling uploads {forward.uploads}"
        assert forward.uploads[BE_MERGE] == 2 * forward.merges, f"pass {index}: BE merge uploads {forward.uploads}"


def params(max_tokens: int, **sampling: Any) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, ignore_eos=True, **sampling)


@pytest.fixture
def ls_engine() -> Iterator[Engine]:
    engine = meta_engine("priority")
    yield engine
    engine.close()


@pytest.mark.slow  # seconds: runs the engine on the meta device
def test_ls_steps_upload_once_and_read_nothing_but_the_sampled_tokens_once(ls_engine: Engine) -> None:
    # Chunked prefill (a 40-token prompt in 16-token chunks), decodes, and every sampling mode in one batch.
    requests = [
        make_request("greedy", list(range(1, 41)), params(6, temperature=0.0)),
        make_request("top-k", [5, 6, 7], params(6, temperature=0.8, top_k=4, seed=1)),
        make_request("top-p", [9] * 11, params(6, top_p=0.5)),
    ]
    for request in requests:
        ls_engine.add_request(request)
    reads = fake_token_reads(ls_engine)
    passes, guard = run_guarded(ls_engine)
    assert not guard.violations
    assert reads.calls == sum(p.sampled for p in passes), "the sampled tokens must come back once per iteration"
    assert_one_upload_per_step(passes)
    assert not all(p.sampled for p in passes), "a prefill-only pass (the 40-token prompt's first chunk) must be seen"
    assert reads.tokens == sum(len(r.output_token_ids) for r in requests) == 18


@pytest.fixture(scope="module")
def piggyback_engine() -> Iterator[Engine]:
    engine = meta_engine("piggyback", max_be_rows_per_layer=3)
    yield engine
    engine.close()


@pytest.mark.slow  # an engine with CPU worker processes
@pytest.mark.parametrize("split", [False, True], ids=["one-batch", "two-sub-batches"])
def test_piggyback_steps_with_be_rows_merging_upload_once_and_read_nothing_but_the_sampled_tokens(
    piggyback_engine: Engine, split: bool
) -> None:
    """Also with plans that prefill split into two sub-batches (IterationPlan.split_at): twice the merge points,
    the same one upload before the layers."""
    engine = piggyback_engine
    pb = engine.piggyback
    assert pb is not None
    merges: list[int] = []
    real_take = pb.take

    def counted_take(layer: int, rows: list[Any]):  # type: ignore[no-untyped-def]
        merges.append(len(rows))
        return real_take(layer, rows)

    pb.take = counted_take  # type: ignore[method-assign]
    requests = [make_request("ls", list(range(1, 30)), params(10, temperature=0.0))]
    requests += [make_request(f"be{i}", list(range(2, 8 + 5 * i)), params(8, seed=i, top_k=5), "BE")
                 for i in range(3)]  # fmt: skip
    for request in requests:
        engine.add_request(request)
    reads = fake_token_reads(engine)
    with SplitPlans(engine) if split else contextlib.nullcontext() as splits:
        passes, guard = run_guarded(engine)
    assert splits is None or splits.split > 0
    assert not guard.violations
    assert reads.calls == sum(p.sampled for p in passes)
    assert_one_upload_per_step(passes)
    assert reads.tokens == 10 + 3 * 8
    # BE rows really took the host path: prefill KV offloaded, CPU attention results merged at every layer.
    layers = engine.arch.num_hidden_layers
    assert sum(merges) >= 3 * 7 * layers, "BE decode tokens did not go through the layer-wise merge"
    assert all(r.finish_reason == "length" for r in requests)
    assert not pb.residuals and not pb.rows


def test_the_guard_catches_each_kind_of_host_sync() -> None:
    """The guard itself must fail on what it is there to catch (and not on device-only work)."""
    device_tensor = torch.zeros(4, device=DEVICE)
    host_tensor = torch.arange(4)
    attempts: dict[str, Callable[[], object]] = {
        "item": lambda: device_tensor.sum().item(),
        "bool": lambda: bool(device_tensor[0] > 0),
        "tolist": lambda: device_tensor.tolist(),
        "cpu": lambda: device_tensor.cpu(),
        "blocking upload": lambda: host_tensor.to(DEVICE),
        "factory upload": lambda: torch.tensor([1, 2], device=DEVICE),
        "mixed devices": lambda: device_tensor.index_select(0, host_tensor),
        "list index": lambda: device_tensor[[0, 2]],
        "blocking copy_": lambda: device_tensor.copy_(host_tensor),
    }
    missed = []
    for name, attempt in attempts.items():
        try:
            with SyncGuard(DEVICE):
                attempt()
        except HostSyncError:
            continue
        missed.append(name)
    assert not missed, f"the guard let these through: {missed}"
    with SyncGuard(DEVICE) as guard:
        uploaded = host_tensor.to(DEVICE, non_blocking=True)
        (device_tensor * 2).index_select(0, uploaded).argmax()
    assert not guard.violations


@pytest.mark.parametrize("device", [torch.device("cpu"), DEVICE])
def test_staging_packs_every_part_into_one_upload_and_gives_each_back_intact(device: torch.device) -> None:
    parts = {
        "ids": torch.tensor([[5, 2**31 - 1], [0, 7]], dtype=torch.int64),
        "flag": torch.tensor([True, False, True]),
        "temperature": torch.tensor([0.7, 1e-3], dtype=torch.float32),  # 4 + 3 + 2: float64 at an odd word
        "uniform": torch.tensor([0.1234567890123, 1 - 2**-53], dtype=torch.float64),
        "empty": torch.zeros(0, dtype=torch.int64),
        "lengths": torch.tensor([3], dtype=torch.int32),
    }
    staging = HostStaging(device)
    for name, tensor in parts.items():
        staging.add(name, tensor)
    uploads: list[torch.Tensor] = []
    real_to = torch.Tensor.to

    def counted_to(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if _device_argument(args, kwargs) is not None:  # a transfer (not a dtype conversion)
            uploads.append(self)
        return real_to(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.Tensor, "to", counted_to)
        with SyncGuard(DEVICE):
            out = staging.upload()
    # (The guard re-enters the patched `to`: count distinct tensors copied.) The CPU is its own device.
    assert len({id(u) for u in uploads}) == (0 if device.type == "cpu" else 1)
    for name, tensor in parts.items():
        assert out[name].device.type == device.type
        assert out[name].dtype == tensor.dtype and out[name].shape == tensor.shape, name
        if device.type == "cpu":
            assert torch.equal(out[name], tensor), name
