"""The model runner: one forward pass over an iteration plan, with BE rows merged layer by layer, then sampling.

It owns what touches tensors: the model, the accelerator's paged KV cache and, when the policy decodes on
the host, the piggyback path (host KV, CPU attention workers, the residual store). Decisions come from the
planner; what the sampled tokens mean (detokenising, stop strings, finishing) is the engine's postprocess.

The forward step never reads a device value on the host (on a GPU that would stall the host until the
queue drains). Everything it needs per iteration (token ids, positions, the attention metadata, BE rows'
tokens, positions and slots, BE prefill rows) is built on the host and goes up in one non-blocking copy
(`HostStaging`; `AttentionBatch.stage` adds the attention part); BE rows move through pinned buffers (see
piggyback/be_path.py); sampling runs on the device for the whole batch, its parameters in a second upload at
the end (which BE rows finish is known only after the last layer). The one read is the sampled token
ids, once, at the end (`_read_tokens`); tests/runtime/test_no_host_sync.py holds the step to this.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from piggyback_runtime import metrics as m
from piggyback_runtime.attention.paged import AttentionBatch, kv_cache_dtype, paged_attention
from piggyback_runtime.config import RuntimeConfig
from piggyback_runtime.cuda_graphs import DecodeBatch, DecodeGraphs, graphs_enabled, schedule
from piggyback_runtime.kv.allocator import BlockAllocator
from piggyback_runtime.kv.cache import PagedKVCache
from piggyback_runtime.kv.host import HostKV
from piggyback_runtime.model.loader import LoadedModel
from piggyback_runtime.piggyback.be_path import BERow, PiggybackPath
from piggyback_runtime.request import Request
from piggyback_runtime.sampling import SamplingTensors, sample_on_device, upload_sampling_tensors
from piggyback_runtime.scheduler.batching import IterationPlan
from piggyback_runtime.scheduler.outputs import IterationOutputs, sampling_requests
from piggyback_runtime.scheduler.policies import Policy
from piggyback_runtime.staging import HostStaging


@dataclass
class RunResult:
    """What one forward pass produced: a token for each request that samples, in order."""

    requests: list[Request]  # the plan's sampling requests, then the BE rows that left the last layer
    tokens: list[int]
    done_rows: list[BERow]  # those BE rows (the tail of `requests`)
    merged_rows: int  # BE rows merged into Dense batches, summed over layers

    @property
    def num_sampled(self) -> int:
        return len(self.requests)

    def outputs(self, started_s: float, num_layers: int) -> IterationOutputs:
        """This pass as the planner's update takes it (`started_s`: when the iteration began)."""
        num_plan = len(self.requests) - len(self.done_rows)
        return IterationOutputs(
            started_s=started_s,
            plan_token_ids=self.tokens[:num_plan],
            host_path_tokens=list(zip(self.requests[num_plan:], self.tokens[num_plan:], strict=True)),
            be_rows_merged=self.merged_rows,
            num_layers=num_layers,
        )


def sample_rows(plan: IterationPlan) -> list[int]:
    """Flat batch rows whose hidden state is sampled: the last token of each chunk that samples."""
    rows: list[int] = []
    row = 0
    for chunk in plan.chunks:
        row += chunk.num_tokens
        if chunk.samples:
            rows.append(row - 1)
    return rows


class ModelRunner:
    piggyback_class: type[PiggybackPath] = PiggybackPath  # tensor parallelism: rank 0's records its changes

    def __init__(
        self,
        config: RuntimeConfig,
        loaded: LoadedModel,
        allocator: BlockAllocator,
        policy: Policy,
        host_kv: HostKV | None,
        metrics: m.RuntimeMetrics,
    ) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.arch = loaded.shard_arch  # under tensor parallelism: this rank's heads and KV heads
        self.device = loaded.device
        self.allocator = allocator  # the planner's: block tables of the plan's requests
        self.block_size = allocator.block_size
        use_graphs = graphs_enabled(config.engine.cuda_graphs, self.device)
        # With graphs, one block past the allocator's is the padded rows' scratch (cuda_graphs.py).
        kv_dtype = kv_cache_dtype(config.engine.kv_cache_dtype, self.device, loaded.dtype)  # fp8 refused off-GPU
        self.kv_cache = PagedKVCache(self.arch, allocator.num_blocks + int(use_graphs), self.block_size, kv_dtype,
                                     self.device)  # fmt: skip
        self.policy = policy
        self.metrics = metrics
        self.scale = 1.0 / math.sqrt(self.arch.head_dim)
        # Decode-only iterations replay a captured graph of the dense step (cuda_graphs.py says when).
        self.graphs: DecodeGraphs | None = None
        if use_graphs:
            self.graphs = DecodeGraphs(self.model, self.kv_cache, config.engine.max_num_seqs, loaded.max_model_len,
                                       self.scale, self.device, loaded.dtype, allocator.num_blocks)  # fmt: skip
        self.piggyback: PiggybackPath | None = None
        if policy.uses_host_path:
            assert host_kv is not None
            self.piggyback = self.piggyback_class(config, self.arch, loaded.dtype, self.device, host_kv, metrics)

    def close(self) -> None:
        if self.piggyback is not None:
            self.piggyback.close()

    # --- BE KV moves: the plan's be_to_host / be_to_gpu (the planner holds the KV on both sides) -------------
    @torch.inference_mode()
    def copy_to_host(self, request: Request) -> None:
        """Copy a BE request's KV so far from its accelerator blocks into the host KV the planner reserved for it,
        layer by layer, without blocking; its accelerator blocks may be reused once this returns."""
        assert self.piggyback is not None, "a KV move needs the piggyback path"
        num_tokens = request.num_tokens - 1  # computed: its last sampled token enters next, on the CPU path
        blocks = self.allocator.blocks_of(request.request_id)
        if len(blocks) * self.block_size < num_tokens:
            raise RuntimeError(f"BE request {request.request_id} holds {len(blocks)} accelerator blocks of "
                               f"{self.block_size} for {num_tokens} tokens of KV")  # fmt: skip
        self.piggyback.copy_from_accelerator(request, self.kv_cache.key, self.kv_cache.value, blocks, num_tokens)

    @torch.inference_mode()
    def copy_to_accelerator(self, request: Request) -> None:
        """Copy a BE row's host KV into the accelerator blocks the planner allocated for it (the row is between
        tokens), layer by layer."""
        assert self.piggyback is not None, "a KV move needs the piggyback path"
        blocks = self.allocator.blocks_of(request.request_id)
        self.piggyback.copy_to_accelerator(request, self.kv_cache.key, self.kv_cache.value, blocks,
                                           request.num_tokens - 1)  # fmt: skip

    @torch.inference_mode()
    def run(self, plan: IterationPlan) -> RunResult:
        """One forward pass: the plan's rows on the accelerator, plus BE rows merged layer by layer; then a
        token for each of the plan's requests that reach their end and each BE row done."""
        requests, token_ids, done_rows, merged = self.launch(plan, sampling_requests(plan))
        tokens = self._read_tokens(token_ids) if requests else []
        return RunResult(requests, tokens, done_rows, merged)

    def _read_tokens(self, token_ids: torch.Tensor) -> list[int]:
        """The iteration's one device-to-host read: the sampled token ids."""
        return token_ids.tolist()

    def launch(
        self, plan: IterationPlan, sampling: list[Request]
    ) -> tuple[list[Request], torch.Tensor, list[BERow], int]:
        """Queue the forward pass and sampling on the device without reading any device value.

        Returns the requests that sample (the plan's, then the BE rows done), their token ids as a device
        tensor, those BE rows, and the BE rows merged (summed over layers).
        """
        graphed = self._launch_graphed(plan, sampling)
        if graphed is not None:
            return graphed
        token_ids: list[int] = []
        positions: list[int] = []
        be_prefills: list[tuple[Request, int, int, int]] = []
        pb = self.piggyback
        for chunk in plan.chunks:
            if chunk.request.placement == "host":  # its KV goes to host KV as it is computed (the planner's call)
                be_prefills.append((chunk.request, len(token_ids), chunk.start, chunk.num_tokens))
            token_ids.extend(chunk.request.token_ids(chunk.start, chunk.start + chunk.num_tokens))
            positions.extend(range(chunk.start, chunk.start + chunk.num_tokens))
        staging = HostStaging(self.device)
        blocks = self.allocator.blocks_of
        staged_attention = AttentionBatch.stage(
            decodes=[(blocks(c.request.request_id), c.start) for c in plan.decodes],
            prefills=[(blocks(c.request.request_id), c.start, c.num_tokens) for c in plan.prefills],
            block_size=self.block_size,
            staging=staging,
        )
        prefill_targets = pb.prefill_targets(be_prefills) if pb is not None else None
        # BE rows travelling with this pass: at layer 0 the tokens that enter the model, after layer l the
        # rows whose layer-l CPU attention was merged into post_attention(l).
        carry: list[BERow] = pb.entering() if pb is not None else []
        staging.add("token_ids", torch.tensor(token_ids, dtype=torch.long))
        staging.add("positions", torch.tensor(positions, dtype=torch.long))
        staging.add("carry_tokens", torch.tensor([r.request.output_token_ids[-1] for r in carry], dtype=torch.long))
        staging.add("carry_positions", torch.tensor([r.position for r in carry], dtype=torch.long))
        staging.add("carry_slots", torch.tensor([r.slot for r in carry], dtype=torch.long))
        staging.add("prefill_rows", torch.tensor(prefill_targets.rows if prefill_targets else [], dtype=torch.long))
        step = staging.upload()  # the iteration's one upload before the layers
        batch = staged_attention.on_device(step)
        model = self.model
        hidden = model.embed(step["token_ids"])
        cos, sin = model.rope(step["positions"], hidden.dtype)
        num_rows = len(token_ids)
        carry_hidden = model.embed(step["carry_tokens"])
        carry_positions, carry_slots = step["carry_positions"], step["carry_slots"]
        merged = len(carry)
        for index, layer in enumerate(model.layers):
            attn = hidden.new_empty((0, self.arch.num_attention_heads, self.arch.head_dim))
            if num_rows or carry:
                x, row_cos, row_sin = hidden, cos, sin
                if carry:
                    carry_cos, carry_sin = model.rope(carry_positions, hidden.dtype)
                    x = torch.cat((hidden, carry_hidden))
                    row_cos, row_sin = torch.cat((cos, carry_cos)), torch.cat((sin, carry_sin))
                q, k, v = layer.pre_attention(x, row_cos, row_sin)
                if num_rows:
                    attn = paged_attention(index, q[:num_rows], k[:num_rows], v[:num_rows], self.kv_cache, batch,
                                           self.scale)  # fmt: skip
                    if prefill_targets is not None:
                        assert pb is not None
                        pb.write_prefill_kv(index, prefill_targets, step["prefill_rows"], k, v)
                if carry:
                    assert pb is not None
                    pb.submit(index, carry, carry_slots, q[num_rows:], k[num_rows:], v[num_rows:], carry_hidden)
                    if self.policy.synchronous_cpu_attention:
                        self._wait_for_cpu(carry)
            ready = pb.ready(index) if pb is not None else []
            if ready:
                assert pb is not None
                be_attn, be_residual, carry_slots, carry_positions = pb.take(index, ready)
                attn, residual = torch.cat((attn, be_attn)), torch.cat((hidden, be_residual))
                merged += len(ready)
            else:
                residual = hidden
            if num_rows or ready:
                out = layer.post_attention(attn, residual)
                hidden, carry_hidden = out[:num_rows], out[num_rows:]
            carry = ready
        requests, tokens = self._sample(plan, sampling, hidden, carry, carry_hidden)
        return requests, tokens, carry, merged

    def _launch_graphed(
        self, plan: IterationPlan, sampling: list[Request]
    ) -> tuple[list[Request], torch.Tensor, list[BERow], int] | None:
        """A decode-only iteration through captured graphs (cuda_graphs.py), BE rows merged at eager layers between
        the captured ranges; None: eager. What decides it is the plan alone (the same on every tensor-parallel
        rank), never a rank's own CPU results."""
        pb, graphs = self.piggyback, self.graphs
        if graphs is None or plan.prefills or not plan.decodes:
            return None
        if any(c.request.placement == "host" for c in plan.chunks):
            return None
        if pb is not None and pb.rows and self.policy.synchronous_cpu_attention:
            return None  # `neo` merges a row in the layer that sent it: no merge point is known ahead
        if graphs.padded_size(len(plan.decodes)) is None:
            return None  # too many rows for any graph
        carry, ready = pb.merge_schedule() if pb is not None and pb.rows else ([], {})
        merge_layers = {0} if carry else set()
        for layer in ready:
            merge_layers.update((layer, layer + 1))
        merged = len(carry) + sum(len(rows) for rows in ready.values())
        blocks = self.allocator.blocks_of
        batch = DecodeBatch(
            token_ids=[c.request.token_ids(c.start, c.start + 1)[0] for c in plan.chunks],
            positions=[c.start for c in plan.chunks],
            block_tables=[blocks(c.request.request_id) for c in plan.chunks],
        )  # fmt: skip
        # The tokens entering layer 0 go up with the batch, in its one upload (rows merged later come with their
        # slots and positions from `take`).
        entering = (
            [r.request.output_token_ids[-1] for r in carry] + [r.position for r in carry] + [r.slot for r in carry]
        )
        begun = graphs.begin(batch, entering)
        assert begun is not None
        size, carry_words = begun
        carry_tokens, carry_positions, carry_slots = carry_words.long().split([len(carry)] * 3)
        carry_hidden = self.model.embed(carry_tokens) if carry else graphs.hidden_out[:0]
        for segment in schedule(graphs.num_layers, merge_layers):
            if not segment.eager:
                graphs.replay(size, segment)
                continue
            # A merge layer, eager on the static buffers: the BE rows join the padded LS rows.
            index, layer = segment.start, self.model.layers[segment.start]
            hidden, x = graphs.hidden_out[:size], graphs.hidden_out[:size]
            row_cos, row_sin = graphs.cos[:size], graphs.sin[:size]
            if carry:
                assert pb is not None
                carry_cos, carry_sin = self.model.rope(carry_positions, hidden.dtype)
                x = torch.cat((hidden, carry_hidden))
                row_cos, row_sin = torch.cat((row_cos, carry_cos)), torch.cat((row_sin, carry_sin))
            q, k, v = layer.pre_attention(x, row_cos, row_sin)
            attn = paged_attention(index, q[:size], k[:size], v[:size], self.kv_cache, graphs.attention_batch(size),
                                   self.scale)  # fmt: skip
            if carry:
                assert pb is not None
                pb.submit(index, carry, carry_slots, q[size:], k[size:], v[size:], carry_hidden)
            residual, rows = hidden, ready.get(index, [])
            if rows:
                assert pb is not None
                be_attn, be_residual, carry_slots, carry_positions = pb.take(index, rows)
                attn, residual = torch.cat((attn, be_attn)), torch.cat((hidden, be_residual))
            out = layer.post_attention(attn, residual)
            graphs.hidden_out[:size].copy_(out[:size])
            carry, carry_hidden = rows, out[size:]
        requests, tokens = self._sample(plan, sampling, graphs.hidden_out[: len(plan.decodes)], carry, carry_hidden)
        return requests, tokens, carry, merged

    def _wait_for_cpu(self, rows: list[BERow]) -> None:
        """Policy `neo`: block until these rows' CPU attention is back (counted: the piggyback path never does)."""
        assert self.piggyback is not None
        started = time.perf_counter()
        while any(row.state == "waiting" for row in rows):
            self.piggyback.idle_wait(0.005)
            self.piggyback.collect()
        self.metrics.cpu_attention_wait_seconds.inc(time.perf_counter() - started)

    def _sample(
        self, plan: IterationPlan, sampling: list[Request], hidden: torch.Tensor, done_rows: list[BERow],
        done_hidden: torch.Tensor,
    ) -> tuple[list[Request], torch.Tensor]:  # fmt: skip
        """Sample, on the device and for the whole batch at once, the plan's rows that reached their last token
        and the BE rows that left the last layer. The per-row parameters and the rows to sample go up in one
        non-blocking copy; what comes back is a device tensor of token ids."""
        requests = sampling + [r.request for r in done_rows]
        if not requests:
            return [], torch.empty(0, dtype=torch.long, device=self.device)
        staging = HostStaging(self.device)
        staging.add("sample_rows", torch.tensor(sample_rows(plan), dtype=torch.long))
        upload_sampling_tensors(staging, requests, self.arch.vocab_size)
        uploaded = staging.upload()
        params = SamplingTensors.from_fields(uploaded)
        logits = self.model.compute_logits(torch.cat((hidden.index_select(0, uploaded["sample_rows"]), done_hidden)))
        return requests, sample_on_device(logits, params)
