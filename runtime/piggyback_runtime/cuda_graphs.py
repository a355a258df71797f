"""CUDA graphs for the dense part of decode-only iterations: one graph per padded batch size.

A Llama-3-8B decode step launches ~1,350 kernels; at small LS batches the host launching them, not the GPU,
sets TPOT. A captured graph replays them all with one launch. What a graph needs, and how this module gives it:

- Static inputs: the captured step reads only `DecodeGraphs`' static buffers (token ids, positions, cache
  slots, context lengths, block tables as wide as max_model_len needs), and writes its hidden states into a
  static output. Per step the host packs the batch into one pinned buffer, uploads it in one non-blocking copy
  and copies it into the static buffers on the device; nothing is read back.
- Static shapes: a batch of n decodes runs in the graph of the smallest capture size >= n (vLLM's sizes: 1, 2,
  4, then multiples of 8). The padded rows are one-token contexts in a scratch block the KV cache holds past
  the allocator's blocks (`scratch_block`, never handed to a request): their k/v land there and their outputs
  are dropped. Captures done ahead of use (`capture_up_to`) run their warm-up on the scratch block too.
- No host value in a launch: the decode attention's split count is fixed per size (from max_model_len) and
  each sequence's split length is computed on the device from its own context (attention/triton_paged.py);
  the padded torch path (no Triton) masks on the device from the lengths.
- Left eager, around the graph: sampling (its parameters differ per step), and any iteration that is not
  decode-only (prefill chunks: their shapes vary) or that has BE rows entering or merging on the piggyback
  path (the merge points concatenate a varying number of host rows into the layer's batch). BE rows whose CPU
  attention is still running do not stop a graph: they join at a later iteration's merge point, which runs
  eager.

`engine.cuda_graphs: auto` turns graphs on for a CUDA device; `off`, and any other device, runs every step
eager. The same `captured_step` runs on any device, so tests on the meta device (no data: any read of a value
raises) hold it to static shapes, static buffers and no host reads (tests/runtime/test_cuda_graphs.py).
"""

from __future__ import annotations

import bisect
import logging
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


@dataclass
class DecodeBatch:
    """One decode-only iteration as the graph takes it: per row its token, position and block table."""

    token_ids: list[int]
    positions: list[int]
    block_tables: list[list[int]]


class DecodeGraphs:
    """Static buffers and the captured decode step of each padded batch size (captured on first use)."""

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
        """`eager_replay`: run `captured_step` itself where a graph would be replayed (tests, on devices with no
        CUDA graphs: the CPU for tokens, meta for shapes and host reads)."""
        if not 0 <= scratch_block < kv_cache.num_blocks:
            raise ValueError(f"scratch block {scratch_block} is not in the KV cache's {kv_cache.num_blocks} blocks")
        self.model = model
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
        hidden = model.arch.hidden_size
        self.hidden_out = torch.zeros(rows, hidden, dtype=dtype, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._pool: object | None = None  # one memory pool shared by every size's graph
        self.replays = 0  # steps that ran a graph (for the suite and the tests)

    def padded_size(self, num_rows: int) -> int | None:
        """The capture size a batch of `num_rows` decodes runs at; None: too large for any graph."""
        index = bisect.bisect_left(self.sizes, num_rows)
        return self.sizes[index] if num_rows > 0 and index < len(self.sizes) else None

    # --- what runs per step outside the graph ---------------------------------------------------------------
    def stage(self, batch: DecodeBatch, size: int) -> torch.Tensor:
        """The batch packed into one host int32 buffer (pinned on CUDA), padded to `size` rows with one-token
        contexts in the scratch block."""
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
        host = torch.empty(len(words), dtype=torch.int32, pin_memory=self.device.type == "cuda")
        host.copy_(torch.tensor(words, dtype=torch.int32))
        return host

    def load(self, host: torch.Tensor, size: int) -> None:
        """One non-blocking upload of the staged batch, then device copies into the static buffers (in place)."""
        uploaded = host if self.device.type == "cpu" else host.to(self.device, non_blocking=True)
        width = (uploaded.numel() - 4 * size) // size
        tokens, positions, slots, lengths, tables = uploaded.split([size, size, size, size, size * width])
        self.token_ids[:size].copy_(tokens)
        self.positions[:size].copy_(positions)
        self.slots[:size].copy_(slots)
        self.lengths[:size].copy_(lengths)
        # Columns past `width` keep older blocks: never read, the lengths bound every read.
        self.block_tables[:size, :width].copy_(tables.view(size, width))

    # --- the captured step ----------------------------------------------------------------------------------
    def captured_step(self, size: int) -> None:
        """The dense decode step over the first `size` rows of the static buffers, into `hidden_out[:size]`.

        Reads only static buffers and the model's weights and KV cache; every shape depends on `size` alone.
        """
        model = self.model
        batch = AttentionBatch(
            slots=self.slots[:size].long(), num_decodes=size, decode_block_tables=self.block_tables[:size],
            decode_lengths=self.lengths[:size], max_decode_len=self.max_model_len, prefills=[],
        )  # fmt: skip
        cache, scale = self.kv_cache, self.scale

        def attention(index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return paged_attention(index, q, k, v, cache, batch, scale)

        hidden = model.forward_layers(self.token_ids[:size], self.positions[:size], attention)
        self.hidden_out[:size].copy_(hidden)

    def _capture(self, size: int) -> torch.cuda.CUDAGraph:
        # Warm up on a side stream first (Triton compiles, cuBLAS picks its kernels), as torch.cuda.graph asks.
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self.captured_step(size)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self._pool):
            self.captured_step(size)
        log.info("captured the decode step for batch size %d", size)
        return graph

    def capture_up_to(self, num_rows: int) -> None:
        """Capture now every size a batch of up to `num_rows` decodes may take (each capture synchronises the
        device once; the GPU suite does this before it checks that steps never synchronise)."""
        if self.eager_replay:
            return
        for size in self.sizes:
            if size not in self.graphs and (size <= num_rows or size == self.padded_size(num_rows)):
                self.load(self.stage(DecodeBatch([], [], []), size), size)  # every row in the scratch block
                self.graphs[size] = self._capture(size)

    def run(self, batch: DecodeBatch) -> torch.Tensor | None:
        """The batch's hidden states after the last layer (a view of the static output), or None when no graph
        takes it (too many rows)."""
        num_rows = len(batch.token_ids)
        size = self.padded_size(num_rows)
        if size is None:
            return None
        self.load(self.stage(batch, size), size)
        if self.eager_replay:
            self.captured_step(size)
        else:
            graph = self.graphs.get(size)
            if graph is None:
                # The warm-up inside ran this batch's step once for real (its k/v writes repeat identically).
                graph = self.graphs[size] = self._capture(size)
            graph.replay()
        self.replays += 1
        return self.hidden_out[:num_rows]
