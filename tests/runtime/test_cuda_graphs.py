"""CUDA graphs of the decode step, proven without a GPU.

What a captured graph needs is checked on the step it captures (`DecodeGraphs.captured_step`), run eagerly:
- on the meta device (shapes, no data: reading any value raises), under test_no_host_sync's `SyncGuard`:
  it reads nothing back, its recorded ops and shapes are the same for any batch padded to the same size
  (other rows, contexts, block tables), and it reads no tensor but the static buffers, the weights and the KV
  cache; the per-step load is one non-blocking upload, copied into the static buffers in place;
- on the CPU: an engine whose decode-only iterations go through the graph path gives the tokens of the
  eager engine.
On a GPU, benchmarks/gpu_suite.py (section `graphs`) captures and replays the real graphs.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from piggyback_runtime.cuda_graphs import DecodeBatch, DecodeGraphs, capture_sizes, graphs_enabled
from piggyback_runtime.engine import Engine
from piggyback_runtime.kv.cache import PagedKVCache
from piggyback_runtime.model.loader import LoadedModel, load_model
from tests.runtime.helpers import greedy, make_request, run_to_completion, tiny_config
from tests.runtime.test_no_host_sync import SyncGuard

META = torch.device("meta")


def test_capture_sizes_are_vllms_and_a_batch_runs_at_the_smallest_size_that_holds_it() -> None:
    assert capture_sizes(256)[:6] == [1, 2, 4, 8, 16, 24] and capture_sizes(256)[-1] == 256
    assert capture_sizes(3) == [1, 2, 4] and capture_sizes(1) == [1] and capture_sizes(9) == [1, 2, 4, 8, 16]
    assert capture_sizes(10_000)[-1] == 256  # larger decode batches run eager
    graphs = DecodeGraphs.__new__(DecodeGraphs)
    graphs.sizes = capture_sizes(40)
    assert [graphs.padded_size(n) for n in (1, 3, 5, 8, 9, 40)] == [1, 4, 8, 8, 16, 40]
    assert graphs.padded_size(41) is None and graphs.padded_size(0) is None


def test_graphs_are_on_for_cuda_under_auto_and_never_when_off() -> None:
    assert graphs_enabled("auto", torch.device("cuda"))
    assert not graphs_enabled("auto", torch.device("cpu")) and not graphs_enabled("off", torch.device("cuda"))
    cfg = tiny_config()
    assert cfg.engine.cuda_graphs == "auto"
    with pytest.raises(ValueError, match="cuda_graphs"):
        tiny_config(cuda_graphs="always")


# --- on the meta device -----------------------------------------------------------------------------------------
class OpRecorder(TorchDispatchMode):
    """Every aten op of the step: its name and output shapes, and any tensor it reads that is neither produced
    inside the step nor one of `allowed` (storages of the static buffers, weights, KV cache)."""

    def __init__(self, allowed: set[int]) -> None:
        super().__init__()
        self.allowed = set(allowed)
        self.trace: list[tuple[str, tuple[tuple[int, ...], ...]]] = []
        self.foreign: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        for tensor in tree_leaves((args, kwargs)):
            on_meta = isinstance(tensor, torch.Tensor) and tensor.dim() and tensor.device.type == "meta"
            if on_meta and tensor.untyped_storage()._cdata not in self.allowed:
                self.foreign.append(f"{func} read a {tuple(tensor.shape)} tensor from outside the step")
        out = func(*args, **kwargs)
        outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        for tensor in outputs:
            self.allowed.add(tensor.untyped_storage()._cdata)  # produced inside the step: fine to read later
        self.trace.append((str(func), tuple(tuple(t.shape) for t in outputs)))
        return out


@pytest.fixture(scope="module")
def meta_graphs() -> DecodeGraphs:
    loaded = load_model(tiny_config().model, "cpu")
    model = loaded.model.to(META)
    cache = PagedKVCache(loaded.arch, 64, 4, loaded.dtype, META)
    return DecodeGraphs(model, cache, max_num_seqs=16, max_model_len=96, scale=loaded.arch.head_dim**-0.5,
                        device=META, dtype=loaded.dtype, scratch_block=63, eager_replay=True)  # fmt: skip


def _storages(graphs: DecodeGraphs) -> set[int]:
    tensors = [graphs._static, graphs.hidden_out, graphs.kv_cache.key, graphs.kv_cache.value,
               *graphs.model.parameters(), *graphs.model.buffers()]  # fmt: skip
    return {t.untyped_storage()._cdata for t in tensors}


def _traced_step(graphs: DecodeGraphs, batch: DecodeBatch) -> tuple[OpRecorder, SyncGuard]:
    size = graphs.padded_size(len(batch.token_ids))
    assert size is not None
    static_pointers = [graphs._static.untyped_storage()._cdata, graphs.hidden_out.untyped_storage()._cdata]
    guard = SyncGuard(META)
    with guard:
        graphs.load(graphs.stage(batch, size), size)
    assert guard.uploads == ["step"], "the per-step load must be one non-blocking upload"
    recorder = OpRecorder(_storages(graphs))
    with SyncGuard(META) as step_guard, recorder:
        graphs.captured_step(size)
    assert not step_guard.violations
    assert [graphs._static.untyped_storage()._cdata, graphs.hidden_out.untyped_storage()._cdata] == static_pointers
    return recorder, step_guard


def test_the_captured_step_reads_nothing_back_reads_only_static_buffers_and_keeps_its_shapes(
    meta_graphs: DecodeGraphs,
) -> None:
    # Two batches padded to size 4: 3 and 4 rows, other tokens, contexts (2 to 90 tokens) and block tables.
    first = DecodeBatch(
        [5, 6, 7], [1, 40, 89], [[3], [9, 4, 11, 2, 8, 1, 12, 13, 14, 15, 16], [20 + i for i in range(23)]]
    )
    second = DecodeBatch([1, 2, 3, 4], [0, 3, 17, 63], [[1], [2], [5, 6, 7, 8, 30], [40 + i for i in range(16)]])
    traces = []
    for batch in (first, second):
        recorder, _ = _traced_step(meta_graphs, batch)
        assert not recorder.foreign, recorder.foreign[:3]
        traces.append(recorder.trace)
    assert traces[0] == traces[1], "the step's ops or shapes depend on the batch, not only on its padded size"
    assert len(traces[0]) > 10 * meta_graphs.model.arch.num_hidden_layers  # the whole dense step was traced
    # Another padded size has other shapes (each size is its own graph).
    recorder, _ = _traced_step(meta_graphs, DecodeBatch([1], [5], [[2, 3]]))
    assert recorder.trace != traces[0]


def test_the_recorder_sees_a_tensor_from_outside_the_step() -> None:
    """The check above must be able to fail: a step reading a tensor it was not given is caught."""
    outside = torch.zeros(3, device=META)
    inside = torch.zeros(3, device=META)
    with OpRecorder({inside.untyped_storage()._cdata}) as recorder:
        inside + 1
    assert not recorder.foreign
    with OpRecorder({inside.untyped_storage()._cdata}) as recorder:
        inside + outside
    assert recorder.foreign


# --- on the CPU: the graph path gives the eager path's tokens ---------------------------------------------------
@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    return load_model(tiny_config().model, "cpu")


def _tokens(loaded: LoadedModel, graphed: bool) -> tuple[list[list[int]], int]:
    engine = Engine(tiny_config(max_num_seqs=8), loaded=loaded)
    runner = engine.runner
    if graphed:  # what auto does on CUDA (a scratch block past the allocator's), the step run in place of a replay
        scratch = engine.allocator.num_blocks
        runner.kv_cache = PagedKVCache(loaded.arch, scratch + 1, runner.block_size, loaded.dtype, runner.device)
        runner.graphs = DecodeGraphs(runner.model, runner.kv_cache, 8, loaded.max_model_len, runner.scale,
                                     runner.device, loaded.dtype, scratch, eager_replay=True)  # fmt: skip
    requests = [make_request(f"r{i}", [1] + [7 + 3 * i] * (2 + 5 * i), greedy(12 - i)) for i in range(5)]
    try:
        for request in requests:
            engine.add_request(request)
        run_to_completion(engine)
    finally:
        engine.close()
    replays = runner.graphs.replays if runner.graphs is not None else 0
    return [r.output_token_ids for r in requests], replays


def test_decode_iterations_through_the_graph_path_give_the_eager_tokens(loaded: LoadedModel) -> None:
    eager, _ = _tokens(loaded, graphed=False)
    graphed, replays = _tokens(loaded, graphed=True)
    assert replays >= 5, "decode-only iterations must have taken the graph path"
    assert graphed == eager
