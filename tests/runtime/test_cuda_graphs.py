"""CUDA graphs of the decode step, with BE rows merged between captured pieces, proven without a GPU.

What a captured graph needs is checked on the code it captures (`DecodeGraphs.piece_step`: the whole step, and
the pieces a step with BE rows replays between its merge layers), run eagerly:
- on the meta device (shapes, no data: reading any value raises), under test_no_host_sync's `SyncGuard`:
  it reads nothing back, makes no tensor on the host, its recorded ops and shapes are the same for any batch
  padded to the same size (other rows, contexts, block tables), it reads no tensor but the static buffers, the
  weights and the KV cache, and leaves its results in the static buffers in place; the per-step load is one
  non-blocking upload, copied into the static buffers in place;
- as a schedule: the eager layers of a step are exactly its merge layers, the rest replayed from aligned pieces;
- on the CPU, with `RecordedGraph` standing in for a CUDA graph (capture records, replay runs eagerly): an
  engine whose decode iterations go through the graph path gives the eager engine's tokens, LS alone and with
  BE rows merging on the piggyback path (and then only the layers with a `submit` or `take` ran eager).
On a GPU, benchmarks/gpu_suite.py (section `graphs`) captures and replays the real graphs.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from piggyback_runtime.attention import cpu_attention
from piggyback_runtime.cuda_graphs import (
    DecodeBatch,
    DecodeGraphs,
    RecordedGraph,
    Segment,
    aligned_pieces,
    capture_sizes,
    graphs_enabled,
    schedule,
)
from piggyback_runtime.engine import Engine
from piggyback_runtime.kv.cache import PagedKVCache
from piggyback_runtime.model.llama import LlamaForCausalLM
from piggyback_runtime.model.loader import LoadedModel, load_model
from piggyback_runtime.model_runner import ModelRunner
from tests.runtime.helpers import greedy, make_request, run_to_completion, tiny_config
from tests.runtime.test_no_host_sync import (
    SyncGuard,
    assert_one_upload_per_step,
    fake_token_reads,
    meta_engine,
    run_guarded,
)
from tests.runtime.test_no_host_sync import params as no_sync_params

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
    """Every aten op of the step: its name and output shapes, any tensor it reads that is neither produced
    inside the step nor one of `allowed` (storages of the static buffers, weights, KV cache), and any tensor it
    makes off the (meta) device."""

    def __init__(self, allowed: set[int]) -> None:
        super().__init__()
        self.allowed = set(allowed)
        self.trace: list[tuple[str, tuple[tuple[int, ...], ...]]] = []
        self.foreign: list[str] = []
        self.made_on_host: list[str] = []  # tensors the step made off the device: host data a graph would freeze

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        for tensor in tree_leaves((args, kwargs)):
            on_meta = isinstance(tensor, torch.Tensor) and tensor.dim() and tensor.device.type == "meta"
            if on_meta and tensor.untyped_storage()._cdata not in self.allowed:
                self.foreign.append(f"{func} read a {tuple(tensor.shape)} tensor from outside the step")
        out = func(*args, **kwargs)
        outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        for tensor in outputs:
            if tensor.device.type != "meta":
                self.made_on_host.append(f"{func} made a {tuple(tensor.shape)} tensor on {tensor.device}")
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
    tensors = [*graphs.static_buffers(), graphs.kv_cache.key, graphs.kv_cache.value, *graphs.model.parameters(),
               *graphs.model.buffers()]  # fmt: skip
    return {t.untyped_storage()._cdata for t in tensors}


def _traced_step(graphs: DecodeGraphs, batch: DecodeBatch, start: int = 0, end: int | None = None) -> OpRecorder:
    """Load the batch (checked: one upload), then run the captured piece of layers [start, end) under the recorder
    and the sync guard (checked: no host read, results in the static buffers in place)."""
    size = graphs.padded_size(len(batch.token_ids))
    assert size is not None
    static_pointers = [t.untyped_storage()._cdata for t in graphs.static_buffers()]
    guard = SyncGuard(META)
    with guard:
        graphs.load(graphs.stage(batch, size), size)
    assert guard.uploads == ["step"], "the per-step load must be one non-blocking upload"
    recorder = OpRecorder(_storages(graphs))
    with SyncGuard(META) as step_guard, recorder:
        graphs.piece_step(size, start, graphs.num_layers if end is None else end)
    assert not step_guard.violations
    assert not recorder.made_on_host, recorder.made_on_host[:3]
    assert [t.untyped_storage()._cdata for t in graphs.static_buffers()] == static_pointers
    return recorder


# Two batches padded to size 4: 3 and 4 rows, other tokens, contexts (2 to 90 tokens) and block tables.
FIRST = DecodeBatch([5, 6, 7], [1, 40, 89], [[3], [9, 4, 11, 2, 8, 1, 12, 13, 14, 15, 16], [20 + i for i in range(23)]])
SECOND = DecodeBatch([1, 2, 3, 4], [0, 3, 17, 63], [[1], [2], [5, 6, 7, 8, 30], [40 + i for i in range(16)]])


def test_the_captured_step_reads_nothing_back_reads_only_static_buffers_and_keeps_its_shapes(
    meta_graphs: DecodeGraphs,
) -> None:
    traces = []
    for batch in (FIRST, SECOND):
        recorder = _traced_step(meta_graphs, batch)
        assert not recorder.foreign, recorder.foreign[:3]
        traces.append(recorder.trace)
    assert traces[0] == traces[1], "the step's ops or shapes depend on the batch, not only on its padded size"
    assert len(traces[0]) > 10 * meta_graphs.model.arch.num_hidden_layers  # the whole dense step was traced
    # Another padded size has other shapes (each size is its own graph).
    recorder = _traced_step(meta_graphs, DecodeBatch([1], [5], [[2, 3]]))
    assert recorder.trace != traces[0]


@pytest.mark.parametrize(("start", "end"), [(0, 0), (0, 1), (1, 2)])
def test_each_piece_between_merge_points_is_capturable_on_its_own(
    meta_graphs: DecodeGraphs, start: int, end: int
) -> None:
    """The pieces a step with BE rows replays (the embedding alone, layer ranges from any layer) hold to the same
    rules as the whole step: static buffers in and out, no host read, shapes fixed by the padded size."""
    traces = []
    for batch in (FIRST, SECOND):
        recorder = _traced_step(meta_graphs, batch, start, end)
        assert not recorder.foreign, recorder.foreign[:3]
        traces.append(recorder.trace)
    assert traces[0] == traces[1] and traces[0]
    embeds = any("embedding" in op for op, _ in traces[0])
    assert embeds == (start == 0), "only a piece from layer 0 embeds the tokens"


def test_a_range_of_layers_is_replayed_as_aligned_pieces_covering_it_once() -> None:
    num_layers = 13
    everything: set[tuple[int, int]] = set()
    for start in range(num_layers):
        for end in range(start + 1, num_layers + 1):
            pieces = aligned_pieces(start, end)
            assert [layer for a, b in pieces for layer in range(a, b)] == list(range(start, end))
            for a, b in pieces:
                length = b - a
                assert length & (length - 1) == 0 and a % length == 0, (a, b)
            assert len(pieces) <= 2 * (end - start).bit_length()
            everything.update(pieces)
    assert len(everything) <= 2 * num_layers  # a bounded number of graphs per size covers every range
    # Capturing ahead (`capture_up_to(..., with_merges=True)`) takes every piece any step may replay.
    graphs = DecodeGraphs.__new__(DecodeGraphs)
    graphs.num_layers = num_layers
    ahead = set(graphs.every_piece())
    assert everything | {(0, 0), (0, num_layers)} == ahead
    for merges in ({0}, {4, 5}, {12}, {1, 7, 8}):
        for segment in schedule(num_layers, merges):
            if not segment.eager:
                assert set(graphs.pieces(segment)) <= ahead


@pytest.mark.parametrize(
    "merge_layers", [set(), {0}, {3, 4}, {0, 5, 6, 11}, {11}, set(range(12))]
)  # fmt: skip
def test_the_eager_layers_of_a_step_are_exactly_its_merge_layers(merge_layers: set[int]) -> None:
    parts = schedule(12, merge_layers)
    eager = [p.start for p in parts if p.eager]
    assert eager == sorted(merge_layers)
    layers = [layer for p in parts for layer in range(p.start, p.end)]
    assert layers == list(range(12)), "every layer runs once, in order"
    assert parts[0].embeds and parts[0].start == 0 and not parts[0].eager  # the embedding comes first, captured
    for before, after in itertools.pairwise(parts):
        assert before.eager or after.eager, "two captured ranges in a row would be one"


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


def _install_eager_replay_graphs(engine: Engine) -> DecodeGraphs:
    """Decode graphs as auto installs them on CUDA (a KV cache with a scratch block past the allocator's), each
    step run eagerly in place of a replay, so that the graphed path runs on the CPU or the meta device."""
    runner = engine.runner
    scratch = engine.allocator.num_blocks
    runner.kv_cache = PagedKVCache(runner.arch, scratch + 1, runner.block_size, runner.loaded.dtype, runner.device)
    runner.graphs = DecodeGraphs(runner.model, runner.kv_cache, 8, runner.loaded.max_model_len, runner.scale,
                                 runner.device, runner.loaded.dtype, scratch, eager_replay=True)  # fmt: skip
    return runner.graphs


def _tokens(loaded: LoadedModel, graphed: bool) -> tuple[list[list[int]], int]:
    engine = Engine(tiny_config(max_num_seqs=8), loaded=loaded)
    runner = engine.runner
    if graphed:
        _install_eager_replay_graphs(engine)
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


# --- on the CPU, with BE rows merging between captured pieces ----------------------------------------------------
@dataclass
class GraphedSteps:
    """Per graphed step: the layers replayed from captured pieces, and the layers where BE rows entered the
    dense batch (`submit`) or their CPU results joined it (`take`)."""

    replayed: list[list[int]] = field(default_factory=list)
    merged: list[set[int]] = field(default_factory=list)
    captured: list[tuple[int, int, int]] = field(default_factory=list)  # (padded size, first layer, end layer)


def _spy(runner: ModelRunner, steps: GraphedSteps) -> None:
    graphs, pb = runner.graphs, runner.piggyback
    assert graphs is not None and pb is not None
    launch_graphed, replay, submit, take = runner._launch_graphed, graphs.replay, pb.submit, pb.take
    inside: list[bool] = []  # in a graphed step (the eager path submits and takes too)

    def spy_launch_graphed(*args: Any) -> Any:
        steps.replayed.append([])
        steps.merged.append(set())
        inside.append(True)
        try:
            result = launch_graphed(*args)
        finally:
            inside.pop()
        if result is None:  # the step ran eager
            steps.replayed.pop()
            steps.merged.pop()
        return result

    def spy_replay(size: int, segment: Segment) -> None:
        steps.replayed[-1].extend(layer for a, b in graphs.pieces(segment) for layer in range(a, b))
        replay(size, segment)

    def spy_submit(layer: int, *args: Any) -> None:
        if inside:
            steps.merged[-1].add(layer)
        submit(layer, *args)

    def spy_take(layer: int, rows: Any) -> Any:
        if inside:
            steps.merged[-1].add(layer)
        return take(layer, rows)

    runner._launch_graphed = spy_launch_graphed  # type: ignore[method-assign]
    graphs.replay = spy_replay  # type: ignore[method-assign]
    pb.submit, pb.take = spy_submit, spy_take  # type: ignore[method-assign]


def _piggyback_tokens(loaded: LoadedModel, graphed: bool) -> tuple[list[list[int]], GraphedSteps]:
    config = tiny_config(max_num_seqs=8, policy="piggyback",
                         piggyback={"num_cpu_workers": 1, "cpu_threads_per_worker": 1})  # fmt: skip
    engine = Engine(config, loaded=loaded)
    runner, steps = engine.runner, GraphedSteps()
    assert runner.piggyback is not None
    if graphed:
        _install_eager_replay_graphs(engine)
        _spy(runner, steps)
    requests = [make_request(f"ls{i}", [1] + [7 + 3 * i] * (2 + 5 * i), greedy(40 - 4 * i)) for i in range(3)]
    requests += [make_request(f"be{i}", [1] + [5 + 2 * i] * (3 + 4 * i), greedy(8), "BE") for i in range(3)]
    try:
        for request in requests:
            engine.add_request(request)
        run_to_completion(engine)
    finally:
        engine.close()
    assert all(r.finish_reason == "length" for r in requests), [(r.request_id, r.error) for r in requests]
    if runner.graphs is not None:
        steps.captured = sorted(runner.graphs.graphs)
        assert all(isinstance(graph, RecordedGraph) for graph in runner.graphs.graphs.values())
    return [r.output_token_ids for r in requests], steps


@pytest.fixture(scope="module")
def deep_loaded(loaded: LoadedModel) -> LoadedModel:
    """tiny-llama's widths with 7 layers: room for merge points inside the step and ranges of several pieces."""
    arch = dataclasses.replace(loaded.arch, num_hidden_layers=7)
    model = LlamaForCausalLM(arch)
    model.init_synthetic(seed=3)
    return dataclasses.replace(loaded, model=model.eval(), arch=arch)


@pytest.mark.slow  # starts CPU attention worker processes
def test_be_rows_merged_between_captured_pieces_give_the_eager_tokens_and_only_merge_layers_run_eager(
    deep_loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(cpu_attention.ENV_BACKEND, "torch")  # no native kernel build in the worker
    eager, _ = _piggyback_tokens(deep_loaded, graphed=False)
    graphed, steps = _piggyback_tokens(deep_loaded, graphed=True)
    assert graphed == eager
    num_layers = deep_loaded.arch.num_hidden_layers
    with_merges = 0
    for replayed, merged in zip(steps.replayed, steps.merged, strict=True):
        assert sorted(replayed) == sorted(set(range(num_layers)) - merged), (replayed, merged)
        with_merges += bool(merged)
    assert with_merges >= 3, "BE rows must have merged in graphed steps"
    assert any(merged - {0, 1} for merged in steps.merged), "merge points inside the step, not only at its start"
    # What was captured: per size the embedding alone, the whole step, and aligned runs of layers, no other range.
    for _, start, end in steps.captured:
        assert (start, end) in ((0, 0), (0, num_layers)) or aligned_pieces(start, end) == [(start, end)]
    for size in {size for size, _, _ in steps.captured}:
        assert sum(1 for s, _, _ in steps.captured if s == size) <= 2 * num_layers + 2


@pytest.mark.slow  # an engine with CPU worker processes, on the meta device
def test_graphed_steps_with_be_rows_merging_read_nothing_back_and_upload_once() -> None:
    """The whole graphed step with BE rows (pieces, merge layers, hand-offs to the CPU path), on the meta device
    under the sync guard: no host read but the sampled tokens, one upload for the step (the BE rows entering ride
    with the batch), one for sampling, two per merge."""
    engine = meta_engine("piggyback", max_be_rows_per_layer=3)
    runner = engine.runner
    graphs = _install_eager_replay_graphs(engine)
    launch_graphed, merged_in_graphs = runner._launch_graphed, []

    def counted(*args: Any) -> Any:
        result = launch_graphed(*args)
        if result is not None:
            merged_in_graphs.append(result[3])
        return result

    runner._launch_graphed = counted  # type: ignore[method-assign]
    try:
        requests = [make_request(f"ls{i}", list(range(1, 6 + 4 * i)), no_sync_params(24, temperature=0.0))
                    for i in range(2)]  # fmt: skip
        requests += [make_request(f"be{i}", list(range(2, 8 + 5 * i)), no_sync_params(6, seed=i), "BE")
                     for i in range(2)]  # fmt: skip
        for request in requests:
            engine.add_request(request)
        reads = fake_token_reads(engine)
        passes, guard = run_guarded(engine)
    finally:
        engine.close()
    assert not guard.violations, guard.violations[:3]
    assert reads.calls == sum(p.sampled for p in passes)
    assert_one_upload_per_step(passes)
    assert all(r.finish_reason == "length" for r in requests)
    assert graphs.replays == len(merged_in_graphs) >= 10
    assert sum(1 for merged in merged_in_graphs if merged) >= 5, "BE rows must have merged in graphed steps"
