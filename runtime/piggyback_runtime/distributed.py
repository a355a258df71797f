"""Tensor parallelism across processes: one process per rank, rank 0 plans, every rank computes.

    rank 0   the server, the planner and a model runner over its shard (`LeaderRunner`); before each forward
             pass it broadcasts the iteration's plan as a `StepMessage` (flat lists of ints: the chunks' token
             ids, starts and lengths, their block tables, and what changed on the piggyback path since the last
             step) on the control group
    rank r   `follower_main`: loads its shard, then runs each plan it receives through the same model runner
             code (`FollowerRunner`) with its own accelerator KV cache (its KV heads), its own host KV shard and
             its own CPU attention workers; it samples nothing (rank 0 samples from the gathered logits)

The data plane is `torch.distributed` (NCCL on GPUs, gloo on CPUs): the two all-reduces per layer and the
vocabulary gathers (model/parallel.py). The control plane is a gloo group (CPU tensors): the step messages and,
on the piggyback path, small all-reduces (before BE rows enter layer 0, and per layer that has BE rows in flight;
two per step for a graphed step), so that a BE row is merged only once its CPU attention is back on every rank
(each rank's workers hold that rank's KV heads), and a row one rank lost (its CPU worker died) fails on every rank.

A rank that dies (or any error inside a tensor-parallel iteration, which leaves the ranks out of step) is
fatal: rank 0 ends the requests in flight with an error, reports not ready and exits non-zero.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import logging
import multiprocessing as mp
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import wait as wait_sentinels
from typing import Any

import torch
import torch.distributed as dist

from piggyback_runtime import metrics as m
from piggyback_runtime.config import RuntimeConfig
from piggyback_runtime.kv.host import HostKV
from piggyback_runtime.model.loader import LoadedModel, load_model, resolve_device
from piggyback_runtime.model.parallel import TensorParallelGroup
from piggyback_runtime.model_runner import ModelRunner, RunResult, sample_rows
from piggyback_runtime.piggyback.be_path import BERow, PiggybackPath
from piggyback_runtime.piggyback.numa import pin_near_gpu
from piggyback_runtime.request import Request
from piggyback_runtime.scheduler.batching import IterationPlan, ScheduledChunk
from piggyback_runtime.scheduler.policies import Policy, make_policy
from piggyback_runtime.staging import HostStaging

log = logging.getLogger(__name__)

# How long rank 0 lets the requests' error events reach their clients (and probes see not-ready) after a rank
# is lost, before it exits non-zero.
RANK_LOST_EXIT_GRACE_S = 3.0
# The control group waits for the next plan for as long as the runtime is idle: no timeout in practice. A dead
# peer is noticed at once on gloo (its sockets close) and by rank 0's watch on its followers' processes.
CONTROL_TIMEOUT = datetime.timedelta(days=30)


class RankLostError(RuntimeError):
    """A tensor-parallel rank is gone, or the ranks are out of step: the runtime cannot go on."""


# --- messages from rank 0 --------------------------------------------------------------------------------------
@dataclass
class RankSetup:
    """Sent once, after rank 0 has sized the caches: every rank's caches have the same number of blocks."""

    num_kv_blocks: int
    num_host_kv_blocks: int


@dataclass
class StepMessage:
    """One iteration's plan, as the other ranks run it. Per chunk: (request id, service class, first position,
    number of tokens, the request's length, is a decode); `token_ids` holds the chunks' tokens back to back."""

    be_rows_per_layer: int = 0
    chunks: list[tuple[str, str, int, int, int, bool]] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    block_tables: dict[str, list[int]] = field(default_factory=dict)  # accelerator KV, the plan's requests
    host_block_tables: dict[str, list[int]] = field(default_factory=dict)  # host KV of BE requests prefilling
    # Piggyback path changes since the last step, in order: ("start", id, slot, worker, generation, position,
    # token, host blocks, sub-batch), ("release", id), ("token_done", id, position, token).
    ops: list[tuple[Any, ...]] = field(default_factory=list)
    split_at: int = 0  # the plan's (two sub-batches)


# --- process group ----------------------------------------------------------------------------------------------
@dataclass
class RankContext:
    tp: TensorParallelGroup
    control_group: Any  # gloo: step messages and the per-layer agreement on BE rows
    followers: list[mp.process.BaseProcess] = field(default_factory=list)  # rank 0 only
    closing: bool = False  # rank 0 is shutting down: followers exiting is expected
    started: bool = False  # every rank has its caches (`start`): from now on a lost rank is fatal

    @property
    def rank(self) -> int:
        return self.tp.rank

    def start(self, setup: RankSetup) -> None:
        """Rank 0: the caches' sizes to the other ranks, which then wait for plans."""
        self.broadcast(setup)
        self.started = True

    def broadcast(self, obj: object) -> object:
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.control_group)
        return box[0]

    def agree_min(self, values: list[int]) -> list[int]:
        """The element-wise minimum over ranks (a BE row is ready when it is ready everywhere)."""
        tensor = torch.tensor(values, dtype=torch.int32)
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN, group=self.control_group)
        return tensor.tolist()

    def lost_followers(self) -> list[str]:
        return [f"rank {i + 1} (pid {p.pid}) exited with code {p.exitcode}"
                for i, p in enumerate(self.followers) if not p.is_alive()]  # fmt: skip


def uses_cuda(config: RuntimeConfig) -> bool:
    return resolve_device(config.device).type == "cuda"


def rank_device(config: RuntimeConfig, rank: int) -> str:
    """Rank r computes on cuda:r (one GPU per rank) or on the CPU."""
    return f"cuda:{rank}" if uses_cuda(config) else "cpu"


def init_rank(config: RuntimeConfig, rank: int, init_method: str) -> RankContext:
    world = config.engine.tensor_parallel_size
    cuda = uses_cuda(config)
    if cuda:
        if torch.cuda.device_count() < world:
            raise RankLostError(f"engine.tensor_parallel_size={world} needs {world} GPUs; this host has "
                                f"{torch.cuda.device_count()}")  # fmt: skip
        torch.cuda.set_device(rank)
        pin_near_gpu(gpu_pci_bus_id(rank))  # before this rank starts its CPU attention workers (they inherit it)
    else:
        # The ranks share this host's cores; OpenMP teams larger than their share spin against each other.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("nccl" if cuda else "gloo", init_method=init_method, rank=rank, world_size=world,
                            timeout=CONTROL_TIMEOUT)  # fmt: skip
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT) if cuda else dist.group.WORLD
    return RankContext(TensorParallelGroup(rank, world, dist.group.WORLD), control)


def gpu_pci_bus_id(index: int) -> str | None:
    """'0000:3b:00.0' of a CUDA device, from torch's device properties (None where torch does not say)."""
    props = torch.cuda.get_device_properties(index)
    bus, device, domain = (getattr(props, f"pci_{k}_id", None) for k in ("bus", "device", "domain"))
    if bus is None or device is None:
        return None
    return f"{domain or 0:04x}:{bus:02x}:{device:02x}.0"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(config: RuntimeConfig, on_lost: Callable[[str], None] | None = None) -> RankContext:
    """In rank 0's process: start ranks 1..tp-1, join the group, and watch the followers (`on_lost(reason)`
    when one exits unexpectedly)."""
    world = config.engine.tensor_parallel_size
    init_method = f"tcp://127.0.0.1:{_free_port()}"
    ctx = mp.get_context("spawn")  # fork would copy this process's threads (and CUDA state)
    followers = []
    for rank in range(1, world):
        process = ctx.Process(target=follower_main, args=(config.model_dump_json(), rank, init_method),
                              name=f"piggyback-tp-rank-{rank}", daemon=False)  # fmt: skip
        process.start()
        log.info("tensor-parallel rank %d: pid %d", rank, process.pid)
        followers.append(process)
    # Not daemonic (a rank starts CPU attention workers of its own): stopped here at exit, or multiprocessing's
    # exit handler would wait for them while they wait for rank 0's next plan.
    atexit.register(_kill, followers)
    ranks = init_rank(config, 0, init_method)
    ranks.followers = followers
    RankWatch(ranks, on_lost).start()
    return ranks


def _kill(processes: list[mp.process.BaseProcess]) -> None:
    for process in processes:
        if process.is_alive():
            process.kill()


class RankWatch(threading.Thread):
    """Rank 0's watch on its followers: a follower that exits while the runtime runs is fatal."""

    def __init__(self, ranks: RankContext, on_lost: Callable[[str], None] | None) -> None:
        super().__init__(name="tp-rank-watch", daemon=True)
        self.ranks = ranks
        self.on_lost = on_lost

    def run(self) -> None:
        sentinels = [p.sentinel for p in self.ranks.followers]
        wait_sentinels(sentinels)
        if self.ranks.closing:
            return
        if not self.ranks.started:
            # Start-up: rank 0's next collective fails, and the engine's load error says so (not ready).
            log.error("tensor-parallel rank failed during start-up: %s", "; ".join(self.ranks.lost_followers()))
            return
        reason = "; ".join(self.ranks.lost_followers()) or "a tensor-parallel rank exited"
        log.error("tensor-parallel rank lost: %s; exiting in %.0f s", reason, RANK_LOST_EXIT_GRACE_S)
        for process in self.ranks.followers:  # the others are blocked in a collective with the lost one
            if process.is_alive():
                process.kill()
        if self.on_lost is not None:
            self.on_lost(reason)
        timer = threading.Timer(RANK_LOST_EXIT_GRACE_S, _exit_rank_lost)
        timer.daemon = True
        timer.start()


def _exit_rank_lost() -> None:
    log.error("exiting: a tensor-parallel rank was lost")
    logging.shutdown()
    os._exit(1)


def abort(ranks: RankContext) -> None:
    """Stop the followers at once (rank 0 failed to start: they would wait for its plans forever)."""
    ranks.closing = True
    _kill(ranks.followers)
    with contextlib.suppress(Exception):
        dist.destroy_process_group()


def close(ranks: RankContext) -> None:
    """Stop the followers (rank 0, at shutdown)."""
    ranks.closing = True
    with contextlib.suppress(Exception):
        if not ranks.lost_followers():
            ranks.broadcast(None)
    for process in ranks.followers:
        process.join(timeout=5)
        if process.is_alive():
            process.kill()
    with contextlib.suppress(Exception):
        dist.destroy_process_group()


# --- rank 0 ------------------------------------------------------------------------------------------------------
class LeaderPiggyback(PiggybackPath):
    """Rank 0's piggyback path: records what changes, for the other ranks' paths to do the same."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ops: list[tuple[Any, ...]] = []

    def start_decode(self, request: Request) -> None:
        super().start_decode(request)
        row = self.rows[request.request_id]
        self.ops.append(("start", request.request_id, row.slot, row.worker, row.generation, row.position,
                         request.output_token_ids[-1], list(self.host_kv.blocks_of(request.request_id)),
                         row.sub_batch))  # fmt: skip

    def release(self, request: Request) -> None:
        super().release(request)
        self.ops.append(("release", request.request_id))

    def token_done(self, row: BERow) -> None:
        super().token_done(row)
        self.ops.append(("token_done", row.request.request_id, row.position, row.request.output_token_ids[-1]))


class LeaderRunner(ModelRunner):
    """Rank 0's model runner: each plan goes to the other ranks before rank 0 runs its own shard of it."""

    piggyback_class = LeaderPiggyback

    def __init__(self, ranks: RankContext, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ranks = ranks
        if self.piggyback is not None:
            self.piggyback.agree = ranks.agree_min

    def message(self, plan: IterationPlan) -> StepMessage:
        msg = StepMessage(be_rows_per_layer=plan.be_rows_per_layer, split_at=plan.split_at)
        pb = self.piggyback
        for index, chunk in enumerate(plan.chunks):
            request = chunk.request
            msg.chunks.append((request.request_id, request.service_class, chunk.start, chunk.num_tokens,
                               request.num_tokens, index < len(plan.decodes)))  # fmt: skip
            msg.token_ids.extend(request.token_ids(chunk.start, chunk.start + chunk.num_tokens))
            msg.block_tables[request.request_id] = list(self.allocator.blocks_of(request.request_id))
            if pb is not None and request.placement == "host":  # its prefill KV goes to host KV
                msg.host_block_tables[request.request_id] = list(pb.host_kv.blocks_of(request.request_id))
        if isinstance(pb, LeaderPiggyback):
            msg.ops, pb.ops = pb.ops, []
        return msg

    def run(self, plan: IterationPlan) -> RunResult:
        try:
            self.ranks.broadcast(self.message(plan))
            return super().run(plan)
        except Exception as exc:
            # A failed collective (a rank died) or an error part-way through the layers: the ranks are out of step.
            # A peer's death reaches the collective first; give its exit a moment to show, to name it.
            wait_sentinels([p.sentinel for p in self.ranks.followers], timeout=2.0)
            lost = self.ranks.lost_followers()
            reason = "; ".join(lost) if lost else f"the ranks are out of step after an error: {exc!r}"
            raise RankLostError(f"tensor-parallel rank lost: {reason}") from exc

    def close(self) -> None:
        super().close()
        close(self.ranks)


# --- ranks 1..tp-1 ---------------------------------------------------------------------------------------------
class _MirrorRequest:
    """What a follower knows of a request: enough to run its rows (ids, tokens, lengths)."""

    def __init__(self, request_id: str, service_class: str, num_tokens: int = 0, start: int = 0,
                 tokens: list[int] | None = None) -> None:  # fmt: skip
        self.request_id = request_id
        self.service_class = service_class
        self.num_tokens = num_tokens
        self._start = start
        self._tokens = tokens or []
        self.output_token_ids: list[int] = []
        self.placement = "gpu"  # "host" for a prefill whose KV goes to host KV (rank 0 sent its host blocks)

    def token_ids(self, start: int, end: int) -> list[int]:
        return self._tokens[start - self._start : end - self._start]


class _BlockTables:
    """A follower's view of rank 0's accelerator block allocator: the tables of the current plan's requests."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.tables: dict[str, list[int]] = {}

    def blocks_of(self, request_id: str) -> list[int]:
        return self.tables[request_id]


class _MirrorHostKV(HostKV):
    """A follower's host KV bookkeeping: rank 0's planner allocates; the follower is told the tables."""

    def __init__(self, num_blocks: int, block_size: int, max_requests: int) -> None:
        super().__init__(num_blocks, block_size, max_requests)
        self.tables: dict[str, list[int]] = {}

    def blocks_of(self, request_id: str) -> list[int]:
        return self.tables[request_id]

    def free(self, request_id: str) -> None:
        self.tables.pop(request_id, None)
        self.slot_of.pop(request_id, None)


class FollowerRunner(ModelRunner):
    """A rank other than 0: runs rank 0's plans on its shard; computes its logits slice for the gather, samples
    nothing."""

    def apply(self, msg: StepMessage) -> IterationPlan:
        """Bring this rank's state to rank 0's (block tables, piggyback rows) and rebuild the plan."""
        tables = self.allocator
        assert isinstance(tables, _BlockTables)
        tables.tables = msg.block_tables
        pb = self.piggyback
        if pb is not None:
            host_kv = pb.host_kv
            assert isinstance(host_kv, _MirrorHostKV)
            host_kv.tables.update(msg.host_block_tables)
            for op in msg.ops:
                self._apply_op(pb, host_kv, op)
            pb.max_rows_per_layer = msg.be_rows_per_layer
        plan = IterationPlan(be_rows_per_layer=msg.be_rows_per_layer, split_at=msg.split_at)
        offset = 0
        for request_id, service_class, start, count, length, is_decode in msg.chunks:
            request = _MirrorRequest(request_id, service_class, length, start, msg.token_ids[offset : offset + count])
            if request_id in msg.host_block_tables:
                request.placement = "host"
            offset += count
            (plan.decodes if is_decode else plan.prefills).append(ScheduledChunk(request, start, count))  # type: ignore[arg-type]
        return plan

    @staticmethod
    def _apply_op(pb: PiggybackPath, host_kv: _MirrorHostKV, op: tuple[Any, ...]) -> None:
        kind, request_id = op[0], op[1]
        if kind == "start":
            _, _, slot, worker, generation, position, token, blocks, sub_batch = op
            # Rank 0 reuses a slot once its own worker is done with it; this rank's may still be writing to it.
            while slot in pb.row_by_slot:
                pb.idle_wait(0.01)
                pb.collect()
            host_kv.tables[request_id] = blocks
            host_kv.slot_of[request_id] = slot
            request = _MirrorRequest(request_id, "BE")
            request.output_token_ids = [token]
            row = BERow(request, slot, worker, generation, position=position, sub_batch=sub_batch)  # type: ignore[arg-type]
            pb.rows[request_id] = row
            pb.row_by_slot[slot] = row
            pb.pool.register(worker, slot, blocks)
            pb.mark_entering(row, position)  # in rank 0's order: the same rows enter layer 0 on every rank
        elif kind == "release":
            pb.release(_MirrorRequest(request_id, "BE"))  # type: ignore[arg-type]
        elif kind == "token_done":
            _, _, position, token = op
            row = pb.rows[request_id]
            row.request.output_token_ids = [token]
            pb.mark_entering(row, position)

    def _sample(self, plan: IterationPlan, sampling: list[Request], hidden: torch.Tensor, done_rows: list[BERow],
                done_hidden: torch.Tensor) -> tuple[list[Request], torch.Tensor]:  # fmt: skip
        """The same logits rows as rank 0 (the gather needs every rank), then nothing: rank 0 samples."""
        if sampling or done_rows:
            staging = HostStaging(self.device)
            staging.add("sample_rows", torch.tensor(sample_rows(plan), dtype=torch.long))
            picked = hidden.index_select(0, staging.upload()["sample_rows"])
            self.model.compute_logits(torch.cat((picked, done_hidden)))
        return [], torch.empty(0, dtype=torch.long, device=self.device)


def follower_main(config_json: str, rank: int, init_method: str) -> None:
    """Entry point of ranks 1..tp-1 (a spawned process); exits non-zero on any error so rank 0 notices."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s tp-rank-{rank} %(levelname)s %(name)s: %(message)s")
    code = 0
    runner: FollowerRunner | None = None
    try:
        config = RuntimeConfig.model_validate_json(config_json)
        ranks = init_rank(config, rank, init_method)
        loaded = load_model(config.model, rank_device(config, rank), ranks.tp)
        setup = ranks.broadcast(None)
        assert isinstance(setup, RankSetup)
        runner = make_follower_runner(config, loaded, setup)
        if runner.piggyback is not None:
            runner.piggyback.agree = ranks.agree_min
        log.info("rank %d ready: %d KV blocks, %d host KV blocks", rank, setup.num_kv_blocks,
                 setup.num_host_kv_blocks)  # fmt: skip
        while (msg := ranks.broadcast(None)) is not None:
            assert isinstance(msg, StepMessage)
            runner.run(runner.apply(msg))
            if runner.piggyback is not None:
                runner.piggyback.take_failures()  # rank 0 ends the requests (the ranks agreed on each failure)
    except Exception:
        log.exception("tensor-parallel rank %d failed", rank)
        code = 1
    finally:
        if runner is not None:
            with contextlib.suppress(Exception):
                runner.close()
    logging.shutdown()
    os._exit(code)  # not a normal exit: the process group's threads must not keep it alive


def make_follower_runner(config: RuntimeConfig, loaded: LoadedModel, setup: RankSetup) -> FollowerRunner:
    engine, pb = config.engine, config.piggyback
    policy: Policy = make_policy(engine.policy, engine.headroom_be_kv_share, pb.max_be_requests)
    host_kv = _MirrorHostKV(setup.num_host_kv_blocks, pb.host_block_size, pb.max_be_requests)
    tables = _BlockTables(setup.num_kv_blocks, engine.block_size)
    return FollowerRunner(config, loaded, tables, policy, host_kv, m.RuntimeMetrics())  # type: ignore[arg-type]
