"""The model runner: one forward pass over an iteration plan, with BE rows merged layer by layer, then sampling.

It owns what touches tensors: the model, the accelerator's paged KV cache and, when the policy decodes on
the host, the piggyback path (host KV, CPU attention workers, the residual store). Decisions come from the
planner; what the sampled tokens mean (detokenising, stop strings, finishing) is the engine's postprocess.

A plan with `split_at` > 0 runs as two sub-batches half a layer apart (NEO's pipelining): per layer A.pre(l),
B.post(l-1), B.pre(l), A.post(l). A BE row on the CPU path merges at its own sub-batch's merge point, so its CPU
attention has the other sub-batch's work to come back in. One batch is the same steps with one sub-batch.

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
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from piggyback_runtime import metrics as m
from piggyback_runtime.attention.paged import AttentionBatch, StagedAttentionBatch, kv_cache_dtype, paged_attention
from piggyback_runtime.config import RuntimeConfig
from piggyback_runtime.cuda_graphs import DecodeBatch, DecodeGraphs, graphs_enabled, schedule
from piggyback_runtime.kv.allocator import BlockAllocator
from piggyback_runtime.kv.cache import PagedKVCache
from piggyback_runtime.kv.host import HostKV
from piggyback_runtime.model.llama import DecoderLayer, LlamaForCausalLM
from piggyback_runtime.model.loader import LoadedModel
from piggyback_runtime.piggyback.be_path import BERow, PiggybackPath, PrefillTargets
from piggyback_runtime.request import Request
from piggyback_runtime.sampling import SamplingTensors, sample_on_device, upload_sampling_tensors
from piggyback_runtime.scheduler.batching import IterationPlan, ScheduledChunk, split_chunks
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


@dataclass(eq=False)
class _SubBatch:
    """One sub-batch of an iteration through the layers: its share of the plan's chunks and the BE rows riding
    with it. An unsplit plan is one of these with every chunk and every BE row (`which` None)."""

    which: int | None  # 0 (A) or 1 (B): the BE rows of that sub-batch merge here; None: all of them
    chunks: list[ScheduledChunk]  # decodes first, then prefill chunks (a cut chunk's part)
    num_decodes: int
    carry: list[BERow] = field(default_factory=list)  # BE rows travelling with it into the next pre_attention
    staged: StagedAttentionBatch | None = None
    prefill_targets: PrefillTargets | None = None
    # On the device once uploaded: plan rows' hidden states, RoPE, attention metadata; the carried rows' hidden
    # states, positions and slots; this layer's attention output between pre and post.
    batch: AttentionBatch | None = None
    hidden: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    cos: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    sin: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    prefill_rows: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    carry_hidden: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    carry_positions: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    carry_slots: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    attn: torch.Tensor = field(default_factory=lambda: torch.empty(0))

    num_rows: int = 0  # plan rows (tokens): the first rows of each layer's batch, the carried BE rows after them

    def __post_init__(self) -> None:
        self.num_rows = sum(chunk.num_tokens for chunk in self.chunks)

    def _name(self, part: str) -> str:
        return part if self.which is None else f"{part}_{'ab'[self.which]}"

    def stage(self, staging: HostStaging, entering: list[BERow], blocks: Callable[[str], list[int]],
              block_size: int, pb: PiggybackPath | None) -> None:  # fmt: skip
        """Stage its per-iteration data (tokens, positions, attention metadata, host-placed prefill rows, the BE
        rows entering layer 0 with it) for the iteration's one upload."""
        token_ids: list[int] = []
        positions: list[int] = []
        be_prefills: list[tuple[Request, int, int, int]] = []
        for chunk in self.chunks:
            if chunk.request.placement == "host":  # its KV goes to host KV as it is computed (the planner's call)
                be_prefills.append((chunk.request, len(token_ids), chunk.start, chunk.num_tokens))
            token_ids.extend(chunk.request.token_ids(chunk.start, chunk.start + chunk.num_tokens))
            positions.extend(range(chunk.start, chunk.start + chunk.num_tokens))
        decodes, prefills = self.chunks[: self.num_decodes], self.chunks[self.num_decodes :]
        self.staged = AttentionBatch.stage(
            decodes=[(blocks(c.request.request_id), c.start) for c in decodes],
            prefills=[(blocks(c.request.request_id), c.start, c.num_tokens) for c in prefills],
            block_size=block_size,
            staging=staging,
            name=self._name("attention_metadata"),
        )
        self.prefill_targets = pb.prefill_targets(be_prefills) if pb is not None else None
        self.carry = entering
        name = self._name
        staging.add(name("token_ids"), torch.tensor(token_ids, dtype=torch.long))
        staging.add(name("positions"), torch.tensor(positions, dtype=torch.long))
        staging.add(name("carry_tokens"), torch.tensor([r.request.output_token_ids[-1] for r in entering],
                                                       dtype=torch.long))  # fmt: skip
        staging.add(name("carry_positions"), torch.tensor([r.position for r in entering], dtype=torch.long))
        staging.add(name("carry_slots"), torch.tensor([r.slot for r in entering], dtype=torch.long))
        rows = self.prefill_targets.rows if self.prefill_targets else []
        staging.add(name("prefill_rows"), torch.tensor(rows, dtype=torch.long))

    def on_device(self, step: dict[str, torch.Tensor], model: LlamaForCausalLM) -> None:
        """Its part of the uploaded step, embedded and with RoPE: ready for layer 0."""
        assert self.staged is not None
        name = self._name
        self.batch = self.staged.on_device(step)
        self.hidden = model.embed(step[name("token_ids")])
        self.cos, self.sin = model.rope(step[name("positions")], self.hidden.dtype)
        self.carry_hidden = model.embed(step[name("carry_tokens")])
        self.carry_positions, self.carry_slots = step[name("carry_positions")], step[name("carry_slots")]
        self.prefill_rows = step[name("prefill_rows")]


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
        pb = self.piggyback
        if plan.split_at and self.policy.synchronous_cpu_attention:
            raise ValueError(f"policy {self.policy.name!r} waits for CPU attention in the layer that sends it, so "
                             f"it runs one batch; this plan splits at token {plan.split_at} (split_at must be 0)")
        first_chunks, second_chunks = split_chunks(plan)
        # Decodes (one token each, never cut) come first: sub-batch A has the first split_at of them.
        first_decodes = min(plan.split_at, len(plan.decodes)) if second_chunks else len(plan.decodes)
        subs = [_SubBatch(None if not second_chunks else 0, first_chunks, first_decodes)]
        if second_chunks:
            subs.append(_SubBatch(1, second_chunks, len(plan.decodes) - first_decodes))
        # BE rows entering layer 0: each rides in its own sub-batch (all in the one batch when not split).
        entering = pb.entering() if pb is not None else []
        staging = HostStaging(self.device)
        for sub in subs:
            sub.stage(staging, [r for r in entering if sub.which in (None, r.sub_batch)], self.allocator.blocks_of,
                      self.block_size, pb)  # fmt: skip
        step = staging.upload()  # the iteration's one upload before the layers
        for sub in subs:
            sub.on_device(step, self.model)
        first, second = subs[0], subs[1] if len(subs) > 1 else None
        # Per layer l: A.pre(l); B.post(l-1); B.pre(l); A.post(l) (one batch: pre(l); post(l)). B runs half a
        # layer behind A: what A's CPU rows compute overlaps B's Dense work and the other way round; A's part of
        # a cut prefill chunk writes its KV of layer l before B's part attends to it.
        merged_at = [0] * len(self.model.layers)  # BE rows merged per layer: the two merge points share its cap
        for index, layer in enumerate(self.model.layers):
            self._pre_attention(first, index, layer)
            if second is not None:
                if index:
                    self._post_attention(second, index - 1, self.model.layers[index - 1], merged_at)
                self._pre_attention(second, index, layer)
            self._post_attention(first, index, layer, merged_at)
        if second is not None:
            last = len(self.model.layers) - 1
            self._post_attention(second, last, self.model.layers[last], merged_at)
        # The plan's flat order is A's rows then B's; the BE rows done leave A's last merge point first.
        hidden = torch.cat([sub.hidden for sub in subs]) if second is not None else first.hidden
        done = [row for sub in subs for row in sub.carry]
        done_hidden = torch.cat([sub.carry_hidden for sub in subs]) if second is not None else first.carry_hidden
        requests, tokens = self._sample(plan, sampling, hidden, done, done_hidden)
        return requests, tokens, done, len(entering) + sum(merged_at)

    def _pre_attention(self, sub: _SubBatch, index: int, layer: DecoderLayer) -> None:
        """pre_attention(index) of the sub-batch's plan rows and the BE rows it carries; accelerator attention of
        its plan rows (their KV of this layer written, host-placed prefill rows' KV to host KV too); its BE
        rows' q/k/v off to the CPU workers. The attention output waits in `sub.attn` for `_post_attention`."""
        pb, model, num_rows, carry = self.piggyback, self.model, sub.num_rows, sub.carry
        sub.attn = sub.hidden.new_empty((0, self.arch.num_attention_heads, self.arch.head_dim))
        if not (num_rows or carry):
            return
        x, row_cos, row_sin = sub.hidden, sub.cos, sub.sin
        if carry:
            carry_cos, carry_sin = model.rope(sub.carry_positions, sub.hidden.dtype)
            x = torch.cat((sub.hidden, sub.carry_hidden))
            row_cos, row_sin = torch.cat((row_cos, carry_cos)), torch.cat((row_sin, carry_sin))
        q, k, v = layer.pre_attention(x, row_cos, row_sin)
        if num_rows:
            assert sub.batch is not None
            sub.attn = paged_attention(index, q[:num_rows], k[:num_rows], v[:num_rows], self.kv_cache, sub.batch,
                                       self.scale)  # fmt: skip
            if sub.prefill_targets is not None:
                assert pb is not None
                pb.write_prefill_kv(index, sub.prefill_targets, sub.prefill_rows, k, v)
        if carry:
            assert pb is not None
            pb.submit(index, carry, sub.carry_slots, q[num_rows:], k[num_rows:], v[num_rows:], sub.carry_hidden)
            if self.policy.synchronous_cpu_attention:
                self._wait_for_cpu(carry)

    def _post_attention(self, sub: _SubBatch, index: int, layer: DecoderLayer, merged_at: list[int]) -> None:
        """The sub-batch's merge point at layer `index`: its BE rows whose CPU result for this layer is in join its
        plan rows in post_attention(index), and go on with it into the next layer (or to sampling)."""
        pb = self.piggyback
        ready: list[BERow] = []
        if pb is not None:
            ready = pb.ready(index, sub.which, pb.max_rows_per_layer - merged_at[index])
        attn, residual = sub.attn, sub.hidden
        if ready:
            assert pb is not None
            be_attn, be_residual, sub.carry_slots, sub.carry_positions = pb.take(index, ready)
            attn, residual = torch.cat((attn, be_attn)), torch.cat((sub.hidden, be_residual))
            merged_at[index] += len(ready)
        if sub.num_rows or ready:
            out = layer.post_attention(attn, residual)
            sub.hidden, sub.carry_hidden = out[: sub.num_rows], out[sub.num_rows :]
        else:
            sub.carry_hidden = sub.carry_hidden[:0]
        sub.carry = ready

    def _launch_graphed(
        self, plan: IterationPlan, sampling: list[Request]
    ) -> tuple[list[Request], torch.Tensor, list[BERow], int] | None:
        """A decode-only iteration through captured graphs (cuda_graphs.py), BE rows merged at eager layers between
        the captured ranges; None: eager (a plan in two sub-batches always is). What decides it is the plan alone
        (the same on every tensor-parallel rank), never a rank's own CPU results."""
        pb, graphs = self.piggyback, self.graphs
        if graphs is None or plan.prefills or not plan.decodes or plan.split_at:
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
