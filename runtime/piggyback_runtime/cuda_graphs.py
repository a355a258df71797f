"""CUDA graphs for the dense part of decode iterations, with or without BE rows merging on the piggyback path.

A Llama-3-8B decode step launches ~1,350 kernels; at small LS batches the host launching them, not the GPU,
sets TPOT. A captured graph replays them with one launch. What a graph needs, and how this module gives it:

- Static inputs: the captured pieces read only `DecodeGraphs`' static buffers (token ids, positions, cache
  slots, context lengths, block tables as wide as max_model_len needs; the running hidden state and the RoPE
  tables) and write their results into static buffers (`hidden_out`, `cos`, `sin`). Per step the host packs the
  batch into one pinned buffer, uploads it in one non-blocking copy and copies it into the static buffers on
  the device; nothing is read back.
- Static shapes: a batch of n decodes runs at the smallest capture size >= n (vLLM's sizes: 1, 2, 4, then
  multiples of 8). The padded rows are one-token contexts in a scratch block the KV cache holds past the
  allocator's blocks (`scratch_block`, never handed to a request): their k/v land there and their outputs are
  dropped. Captures done ahead of use (`capture_up_to`) run their warm-up on the scratch block too.
- No host value in a launch: the decode attention's split count is fixed per size (from max_model_len) and
  each sequence's split length is computed on the device from its own context (attention/triton_paged.py);
  the padded torch path (no Triton) masks on the device from the lengths.
- BE rows (the piggyback path) enter and leave the dense batch at merge points: a layer where rows enter
  pre_attention (the tokens entering layer 0, rows going on after a merge) or where CPU attention results join
  post_attention. Their number varies per step, so those layers run eager, on the same static buffers. The
  layer ranges between merge points replay captured pieces (`schedule`): a whole range [0, L) is one graph; any
  other range is split into aligned power-of-two runs of layers (at most 2L pieces per size, about log2 L
  launches per range), so a few dozen graphs per size cover every set of merge points. The merge points are
  fixed when the step starts (`PiggybackPath.merge_schedule`): a CPU result landing during the step joins the
  next one.
- Left eager: sampling (its parameters differ per step), the merge layers above, iterations with a prefill
  chunk (their shapes vary), and policies that wait for CPU attention inside the layer (`neo`).

`engine.cuda_graphs: auto` turns graphs on for a CUDA device; `off`, and any other device, runs every step
eager. With `eager_replay` a piece is a `RecordedGraph`: "capturing" records its key and replaying runs the
same Python code eagerly, so tests on the CPU (tokens against the eager path, with BE rows merged) and on the
meta device (no data: any read of a value raises; static shapes, static buffers, no host read) hold the
captured code to what a CUDA graph needs (tests/runtime/test_cuda_graphs.py).
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from piggyback_runtime.attention.paged import AttentionBatch, paged_attention
from piggyback_runtime.kv.allocator import flat_slot
from piggyback_runtime.kv.cache import PagedKVCache
from piggyback_runtime.model.llama import LlamaForCausalLM

log = logging.getLogger(__name__)

MAX_CAPTURE_SIZE = 256  # decode batches above this run eager (their launch overhead is a small share)


def capture_sizes(max_num_seqs: int) -> list[int]:
    """Padded batch sizes that get a graph: 1, 2, 4, then multiples of 8, up to the first that holds
    max_num_seqs rows (at most MAX_CAPTURE_SIZE)."""
    top = min(max_num_seqs, MAX_CAPTURE_SIZE)
    candidates = [1, 2, 4, *range(8, MAX_CAPTURE_SIZE + 1, 8)]
    return [size for size in candidates if size < top] + [next(size for size in candidates if size >= top)]


def graphs_enabled(setting: str, device: torch.device) -> bool:
    """`engine.cuda_graphs`: auto = on for a CUDA device, off elsewhere; off = never."""
    return setting == "auto" and device.type == "cuda"


def aligned_pieces(start: int, end: int) -> list[tuple[int, int]]:
    """[start, end) as consecutive runs of layers, each a power of two long and starting at a multiple of its
    length (the nodes of a segment tree): any range takes O(log) pieces and all ranges share <= 2L pieces."""
    pieces = []
    while start < end:
        length = start & -start if start else 1 << (end - start).bit_length()
        while start + length > end:
            length //= 2
        pieces.append((start, start + length))
        start += length
    return pieces


@dataclass(frozen=True)
class Segment:
    """One part of a graphed step: layers [start, end) replayed from captured pieces, or one merge layer run
    eager (`eager`, end = start + 1). `embeds`: the part begins with the embedding and RoPE tables."""

    start: int
    end: int
    eager: bool
    embeds: bool = False


def schedule(num_layers: int, merge_layers: set[int]) -> list[Segment]:
    """The step's parts in order: each merge layer eager, the ranges between them captured. The embedding goes
    with the first captured range, or is a piece of its own when layer 0 is a merge layer."""
    parts: list[Segment] = []
    if 0 in merge_layers:
        parts.append(Segment(0, 0, eager=False, embeds=True))
    start = 0
    for layer in [*sorted(m for m in merge_layers if 0 <= m < num_layers), num_layers]:
        if start < layer:
            parts.append(Segment(start, layer, eager=False, embeds=start == 0))
        if layer < num_layers:
            parts.append(Segment(layer, layer + 1, eager=True))
        start = layer + 1
    return parts


@dataclass
class DecodeBatch:
    """One decode iteration's LS rows as the graph takes them: per row its token, position and block table."""

    token_ids: list[int]
    positions: list[int]
    block_tables: list[list[int]]


PieceKey = tuple[int, int, int]  # (padded size, first layer, end layer); (size, 0, 0): the embedding alone


class RecordedGraph:
    """A stand-in for torch.cuda.CUDAGraph where there are none (tests): capture records what would be captured,
    replay runs the same code eagerly."""

    def __init__(self, key: PieceKey, step: Callable[[], None]) -> None:
        self.key = key
        self.step = step
        self.replays = 0

    def replay(self) -> None:
        self.replays += 1
        self.step()


class DecodeGraphs:
    """Static buffers and the captured pieces of the decode step per padded batch size (captured on first use)."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_cache: PagedKVCache,
        max_num_seqs: int,
        max_model_len: int,
        scale: float,
        device: torch.device,
        dtype: torch.dtype,
        scratch_block: int,
        eager_replay: bool = False,
    ) -> None:
        """`eager_replay`: pieces are `RecordedGraph`s (tests, on devices with no CUDA graphs: the CPU for
        tokens, meta for shapes and host reads)."""
        if not 0 <= scratch_block < kv_cache.num_blocks:
            raise ValueError(f"scratch block {scratch_block} is not in the KV cache's {kv_cache.num_blocks} blocks")
        self.model = model
        self.num_layers = len(model.layers)
        self.eager_replay = eager_replay
        self.scratch_block = scratch_block
        self.kv_cache = kv_cache
        self.block_size = kv_cache.block_size
        self.sizes = capture_sizes(max_num_seqs)
        self.max_size = self.sizes[-1] if self.sizes else 0
        self.max_model_len = max_model_len
        self.table_width = -(-max_model_len // self.block_size)
        self.scale = scale
        self.device = device
        rows, width = self.max_size, self.table_width
        # One int32 buffer, in parts: tokens, positions, slots, lengths [rows] each, then tables [rows, width].
        self._static = torch.zeros(rows * (4 + width), dtype=torch.int32, device=device)
        parts = self._static.split([rows, rows, rows, rows, rows * width])
        self.token_ids, self.positions, self.slots, self.lengths = parts[:4]
        self.block_tables = parts[4].view(rows, width)
        # The running hidden state: each piece reads it and writes its result back in place.
        self.hidden_out = torch.zeros(rows, model.arch.hidden_size, dtype=dtype, device=device)
        cos, sin = model.rope(self.positions.long(), dtype)
        self.cos, self.sin = torch.zeros_like(cos), torch.zeros_like(sin)
        self.graphs: dict[PieceKey, torch.cuda.CUDAGraph | RecordedGraph] = {}
        self._pool: object | None = None  # one memory pool shared by every piece's graph
        self.replays = 0  # steps that ran through the graphs (for the suite and the tests)
        self.launches = 0  # pieces replayed, summed over steps

    def static_buffers(self) -> list[torch.Tensor]:
        """What the captured pieces read and write besides the weights and the KV cache."""
        return [self._static, self.hidden_out, self.cos, self.sin]

    def padded_size(self, num_rows: int) -> int | None:
        """The capture size a batch of `num_rows` decodes runs at; None: too large for any graph."""
        index = bisect.bisect_left(self.sizes, num_rows)
        return self.sizes[index] if num_rows > 0 and index < len(self.sizes) else None

    # --- what runs per step outside the graph ---------------------------------------------------------------
    def stage(self, batch: DecodeBatch, size: int, extra: Sequence[int] = ()) -> torch.Tensor:
        """The batch packed into one host int32 buffer (pinned on CUDA), padded to `size` rows with one-token
        contexts in the scratch block; `extra` words at the end ride along (the BE rows entering layer 0)."""
        pad = size - len(batch.token_ids)
        width = max(1, max((len(table) for table in batch.block_tables), default=1))
        scratch = self.scratch_block
        tables = [table + [scratch] * (width - len(table)) for table in batch.block_tables]
        slots = [flat_slot(table, position, self.block_size) for table, position in
                 zip(batch.block_tables, batch.positions, strict=True)]  # fmt: skip
        lengths = [position + 1 for position in batch.positions]
        words: list[int] = []
        for part, padding in ((batch.token_ids, 0), (batch.positions, 0), (slots, scratch * self.block_size),
                              (lengths, 1)):  # fmt: skip
            words.extend(part)
            words.extend([padding] * pad)
        for table in tables + [[scratch] * width] * pad:
            words.extend(table)
        words.extend(extra)
        host = torch.empty(len(words), dtype=torch.int32, pin_memory=self.device.type == "cuda")
        host.copy_(torch.tensor(words, dtype=torch.int32))
        return host

    def load(self, host: torch.Tensor, size: int, num_extra: int = 0) -> torch.Tensor:
        """One non-blocking upload of the staged batch, then device copies into the static buffers (in place).
        Returns the `num_extra` words staged after the batch, on the device (int32)."""
        uploaded = host if self.device.type == "cpu" else host.to(self.device, non_blocking=True)
        width = (uploaded.numel() - num_extra - 4 * size) // size
        tokens, positions, slots, lengths, tables, extra = uploaded.split(
            [size, size, size, size, size * width, num_extra]
        )
        self.token_ids[:size].copy_(tokens)
        self.positions[:size].copy_(positions)
        self.slots[:size].copy_(slots)
        self.lengths[:size].copy_(lengths)
        # Columns past `width` keep older blocks: never read, the lengths bound every read.
        self.block_tables[:size, :width].copy_(tables.view(size, width))
        return extra

    # --- the captured code ----------------------------------------------------------------------------------
    def attention_batch(self, size: int) -> AttentionBatch:
        """The decode attention metadata of the first `size` rows, as views of the static buffers."""
        return AttentionBatch(
            slots=self.slots[:size].long(), num_decodes=size, decode_block_tables=self.block_tables[:size],
            decode_lengths=self.lengths[:size], max_decode_len=self.max_model_len, prefills=[],
        )  # fmt: skip

    def piece_step(self, size: int, start: int, end: int) -> None:
        """Layers [start, end) over the first `size` rows of the static buffers (from layer 0: the embedding and
        the RoPE tables first), the result back into `hidden_out[:size]`.

        Reads only static buffers and the model's weights and KV cache; every shape depends on `size` alone.
        """
        model = self.model
        if start == 0:
            self.hidden_out[:size].copy_(model.embed(self.token_ids[:size]))
            cos, sin = model.rope(self.positions[:size], self.hidden_out.dtype)
            self.cos[:size].copy_(cos)
            self.sin[:size].copy_(sin)
        if start == end:
            return
        batch, cache, scale = self.attention_batch(size), self.kv_cache, self.scale
        hidden, cos, sin = self.hidden_out[:size], self.cos[:size], self.sin[:size]
        for index in range(start, end):
            layer = model.layers[index]
            q, k, v = layer.pre_attention(hidden, cos, sin)
            hidden = layer.post_attention(paged_attention(index, q, k, v, cache, batch, scale), hidden)
        self.hidden_out[:size].copy_(hidden)

    def captured_step(self, size: int) -> None:
        """The whole dense decode step (embedding and every layer), into `hidden_out[:size]`."""
        self.piece_step(size, 0, self.num_layers)

    def pieces(self, segment: Segment) -> list[tuple[int, int]]:
        """The captured pieces a captured part replays: the whole step as one, else aligned runs of layers (the
        first also embeds when the part starts at layer 0)."""
        if segment.start == 0 and segment.end in (0, self.num_layers):
            return [(0, segment.end)]
        return aligned_pieces(segment.start, segment.end)

    def _capture(self, key: PieceKey) -> torch.cuda.CUDAGraph | RecordedGraph:
        size, start, end = key

        def step() -> None:
            self.piece_step(size, start, end)

        if self.eager_replay:
            return RecordedGraph(key, step)
        # Warm up on a side stream first (Triton compiles, cuBLAS picks its kernels), as torch.cuda.graph asks.
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            step()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self._pool):
            step()
        log.info("captured decode layers [%d, %d) for batch size %d", start, end, size)
        return graph

    def replay(self, size: int, segment: Segment) -> None:
        """Replay a captured part over the loaded batch (pieces captured on first use: the warm-up inside runs
        the batch's step once for real, and its k/v writes repeat identically)."""
        for start, end in self.pieces(segment):
            key = (size, start, end)
            graph = self.graphs.get(key)
            if graph is None:
                graph = self.graphs[key] = self._capture(key)
            graph.replay()
            self.launches += 1

    def every_piece(self) -> list[tuple[int, int]]:
        """Every piece a step may replay, whatever its merge layers: the embedding alone, the whole step, and each
        aligned run of layers (the nodes of a segment tree over the layers)."""
        pieces = {(0, 0), (0, self.num_layers)}
        length = 1
        while length <= self.num_layers:
            pieces.update((start, start + length) for start in range(0, self.num_layers - length + 1, length))
            length *= 2
        return sorted(pieces)

    def capture_up_to(self, num_rows: int, with_merges: bool = False) -> None:
        """Capture now, for every size a batch of up to `num_rows` decodes may take, the whole step, and with
        `with_merges` every piece a step with BE rows merging may replay. Each capture synchronises the device
        once; the GPU suite does this before it checks that steps never synchronise."""
        if self.eager_replay:
            return
        pieces = self.every_piece() if with_merges else [(0, self.num_layers)]
        for size in self.sizes:
            if size <= num_rows or size == self.padded_size(num_rows):
                self.load(self.stage(DecodeBatch([], [], []), size), size)  # every row in the scratch block
                for start, end in pieces:
                    if (size, start, end) not in self.graphs:
                        self.graphs[(size, start, end)] = self._capture((size, start, end))

    def begin(self, batch: DecodeBatch, extra: Sequence[int] = ()) -> tuple[int, torch.Tensor] | None:
        """Load the batch into the static buffers (one upload, `extra` words with it); its padded size and the
        extra words on the device, or None when no graph takes it (too many rows: the step runs eager)."""
        size = self.padded_size(len(batch.token_ids))
        if size is None:
            return None
        extra_on_device = self.load(self.stage(batch, size, extra), size, len(extra))
        self.replays += 1
        return size, extra_on_device

    def run(self, batch: DecodeBatch) -> torch.Tensor | None:
        """A step with no merge point: the batch's hidden states after the last layer (a view of the static
        output), or None when no graph takes it (too many rows)."""
        begun = self.begin(batch)
        if begun is None:
            return None
        size, _ = begun
        for segment in schedule(self.num_layers, set()):
            self.replay(size, segment)
        return self.hidden_out[: len(batch.token_ids)]
