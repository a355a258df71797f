"""Tensor parallelism (engine.tensor_parallel_size, distributed.py, model/parallel.py), on the CPU with gloo.

The spec: tp 2 and 4 produce the tokens of tp 1 (greedy, fp32) on the LS path and on the BE (piggyback) path,
with chunked prefill on and off, for synthetic models and a generated Qwen2-style `file://` model whose
weights are spread over several safetensors files (each rank reads only its slices); a rank killed mid-run
makes the runtime report not-ready, end the requests in flight with an error event and exit non-zero.
Where tokens part, they may only do so at a near-tie (tests/runtime/helpers.py): a row-parallel layer sums
its partial products in another order than one matmul does.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import re
import subprocess
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from piggyback_runtime import metrics as m
from piggyback_runtime.attention import cpu_attention
from piggyback_runtime.client import free_port, start_server, wait_ready
from piggyback_runtime.config import RuntimeConfig
from piggyback_runtime.model import loader
from piggyback_runtime.model.arch import (
    TP_ALLREDUCES_PER_LAYER,
    ModelArch,
    ModelLoadError,
    synthetic_arch,
    tp_allreduce_message_bytes,
)
from piggyback_runtime.model.llama import LlamaForCausalLM
from piggyback_runtime.model.parallel import (
    ShardSpec,
    TensorParallelGroup,
    allreduce_bytes_per_token_layer,
    padded_vocab,
    shard_spec,
    take_shard,
)
from piggyback_runtime.model.tokenizer import builtin_tokenizer
from piggyback_runtime.piggyback import numa
from tests.runtime.helpers import (
    LS_SLO,
    assert_matches_reference,
    greedy,
    hf_reference,
    make_request,
    reference_greedy,
    run_to_completion,
    tiny_config,
)

PROMPTS = [[1, *range(10, 10 + n)] for n in (3, 17, 30, 1, 9)]
CLASSES = ["LS", "BE", "LS", "BE", "BE"]
MAX_TOKENS = 10

# A Qwen2-style model (q/k/v bias) with 4 KV heads, so that it splits over 4 ranks, and a vocabulary that 4 does
# not divide (the vocabulary-parallel embedding and lm_head pad it).
QWEN2_TP = ModelArch("qwen2", 510, 128, 256, 2, 4, 4, 32, 2048, rms_norm_eps=1e-6, rope_theta=1000000.0,
                     attention_bias=True, bos_token_id=None, eos_token_ids=(2,))  # fmt: skip


def write_qwen2_folder(folder: Path, num_files: int = 3) -> dict[str, torch.Tensor]:
    """A Hugging Face folder: config.json, tokenizer, and the weights over `num_files` safetensors files with an
    index (as large checkpoints come). Returns the weights."""
    model = LlamaForCausalLM(QWEN2_TP)
    model.init_synthetic(seed=7)
    state = {name: t.contiguous() for name, t in model.state_dict().items()}
    names = sorted(state)
    weight_map = {}
    for index in range(num_files):
        file = f"model-{index + 1:05d}-of-{num_files:05d}.safetensors"
        part = names[index::num_files]
        save_file({name: state[name] for name in part}, str(folder / file))
        weight_map.update(dict.fromkeys(part, file))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(QWEN2_TP.to_hf_config()))
    tokenizer = builtin_tokenizer(QWEN2_TP.vocab_size)
    tokenizer.backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": None, "eos_token": "<|end_of_text|>"}))
    return state


# --- how a rank takes its part ---------------------------------------------------------------------------------
def test_each_weight_is_split_the_megatron_way() -> None:
    assert shard_spec("model.layers.0.self_attn.q_proj.weight") == ShardSpec(0)
    assert shard_spec("model.layers.0.self_attn.k_proj.bias") == ShardSpec(0)
    assert shard_spec("model.layers.3.mlp.up_proj.weight") == ShardSpec(0)
    assert shard_spec("model.layers.0.self_attn.o_proj.weight") == ShardSpec(1)
    assert shard_spec("model.layers.0.mlp.down_proj.weight") == ShardSpec(1)
    assert shard_spec("model.embed_tokens.weight") == ShardSpec(0, vocab=True)
    assert shard_spec("lm_head.weight") == ShardSpec(0, vocab=True)
    assert shard_spec("model.layers.0.input_layernorm.weight") == ShardSpec(None)


def test_slices_cover_the_tensor_once_and_the_vocabulary_is_padded() -> None:
    weight = torch.arange(10 * 6, dtype=torch.float32).view(10, 6)
    rows = [take_shard(weight, (10, 6), ShardSpec(0), r, 2) for r in range(2)]
    assert torch.equal(torch.cat(rows), weight)
    cols = [take_shard(weight, (10, 6), ShardSpec(1), r, 3) for r in range(3)]
    assert torch.equal(torch.cat(cols, dim=1), weight)
    assert padded_vocab(10, 4) == 12
    vocab = [take_shard(weight, (10, 6), ShardSpec(0, vocab=True), r, 4) for r in range(4)]
    assert [v.shape[0] for v in vocab] == [3, 3, 3, 3]
    assert torch.equal(torch.cat(vocab)[:10], weight) and not torch.cat(vocab)[10:].any()


def test_a_size_the_heads_do_not_divide_is_refused_naming_the_field() -> None:
    arch = synthetic_arch("tiny-llama")  # 4 heads, 2 KV heads
    assert arch.shard(2).num_key_value_heads == 1 and arch.shard(2).num_attention_heads == 2
    with pytest.raises(ModelLoadError, match=r"engine\.tensor_parallel_size=4 .*num_key_value_heads \(2\)"):
        arch.shard(4)
    with pytest.raises(ModelLoadError, match="tensor_parallel_size=3"):
        loader.load_model(tiny_config().model, "cpu", TensorParallelGroup(0, 3, None))
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        tiny_config(tensor_parallel_size=0)


def test_a_rank_reads_only_its_slices_of_a_sharded_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = write_qwen2_folder(tmp_path)
    read_whole: list[str] = []

    class SliceOnly:  # safe_open that records any whole-tensor read
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.inner = safe_open(*args, **kwargs)

        def __enter__(self) -> SliceOnly:
            self.inner.__enter__()
            return self

        def __exit__(self, *exc: object) -> None:
            self.inner.__exit__(*exc)

        def keys(self) -> list[str]:
            return list(self.inner.keys())

        def get_slice(self, name: str) -> Any:
            return self.inner.get_slice(name)

        def get_tensor(self, name: str) -> torch.Tensor:
            read_whole.append(name)
            return self.inner.get_tensor(name)

    monkeypatch.setattr(loader, "safe_open", SliceOnly)
    config = tiny_config(f"file://{tmp_path}")
    for rank in range(4):
        loaded = loader.load_model(config.model, "cpu", TensorParallelGroup(rank, 4, None))
        params = dict(loaded.model.named_parameters())
        assert loaded.shard_arch.num_key_value_heads == 1 and loaded.arch.num_key_value_heads == 4
        q = state["model.layers.1.self_attn.q_proj.weight"]
        assert torch.equal(params["model.layers.1.self_attn.q_proj.weight"], q[rank * 32 : (rank + 1) * 32])
        down = state["model.layers.0.mlp.down_proj.weight"]
        assert torch.equal(params["model.layers.0.mlp.down_proj.weight"], down[:, rank * 64 : (rank + 1) * 64])
        embed = params["model.embed_tokens.weight"]  # 510 rows padded to 512: 128 per rank
        assert embed.shape[0] == 128 and torch.equal(
            embed[:126], state["model.embed_tokens.weight"][rank * 128 :][:126]
        )
    assert read_whole == []


# --- tp n gives the tokens of tp 1 ---------------------------------------------------------------------------------
def _scenario_config(uri: str, tp: int, policy: str, chunked: bool) -> RuntimeConfig:
    return tiny_config(uri, policy=policy, tensor_parallel_size=tp, enable_chunked_prefill=chunked,
                       max_num_batched_tokens=16 if chunked else 64,
                       piggyback={"num_cpu_workers": 1, "cpu_threads_per_worker": 1},
                       slo_control={"enabled": False})  # fmt: skip


def _run_scenarios(scenarios: list[tuple[str, int, str, bool]], results: Any) -> None:
    """In a fresh process (rank 0 of each run; torch.distributed is per process): each scenario's tokens."""
    from piggyback_runtime.engine import Engine

    try:
        for uri, tp, policy, chunked in scenarios:
            engine = Engine(_scenario_config(uri, tp, policy, chunked))
            try:
                requests = [make_request(f"r{i}", p, greedy(MAX_TOKENS), c)
                            for i, (p, c) in enumerate(zip(PROMPTS, CLASSES, strict=True))]  # fmt: skip
                for request in requests:
                    engine.add_request(request)
                run_to_completion(engine)
                merged = engine.metrics.registry.get_sample_value(f"{m.BE_ROWS_MERGED}_sum") or 0.0
                results.put(("ok", [r.output_token_ids for r in requests], merged))
            finally:
                engine.close()
    except BaseException as exc:  # reported to the test
        results.put(("error", repr(exc), 0.0))


@pytest.mark.slow
def test_tp_2_and_4_give_the_tokens_of_tp_1_on_the_ls_and_be_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The CPU workers use the torch kernel: no native build in the rank processes (the kernels have their tests).
    monkeypatch.setenv(cpu_attention.ENV_BACKEND, "torch")
    write_qwen2_folder(tmp_path)
    qwen2 = f"file://{tmp_path}"
    scenarios = [
        # (model, tp, policy, chunked prefill): `piggyback` decodes the BE requests on CPU workers per rank.
        ("synthetic://tiny-llama", 2, "piggyback", False),
        ("synthetic://tiny-llama-mha", 4, "piggyback", True),
        (qwen2, 2, "priority", True),
        (qwen2, 4, "priority", False),
    ]
    results = mp.get_context("spawn").Queue()
    process = mp.get_context("spawn").Process(target=_run_scenarios, args=(scenarios, results))
    process.start()
    outcomes = []
    try:
        for _ in scenarios:
            outcomes.append(results.get(timeout=240))
            assert outcomes[-1][0] == "ok", outcomes[-1][1]
    finally:
        process.join(timeout=30)
        if process.is_alive():
            process.kill()

    engines: dict[str, Any] = {}
    for (uri, tp, policy, chunked), (_, tokens, merged) in zip(scenarios, outcomes, strict=True):
        if uri not in engines:
            engines[uri] = _tp1_engine(uri)
        one = engines[uri]
        expected = _tp1_tokens(one, policy, chunked)
        if policy == "piggyback":
            assert merged > 0, f"{uri} tp {tp}: no BE row took the CPU path"
        for prompt, ours, tp1 in zip(PROMPTS, tokens, expected, strict=True):
            if ours != tp1:  # only at a near-tie of the logits (Hugging Face's, on the same weights)
                hf = hf_reference(one.arch, one.model.state_dict())
                assert_matches_reference(ours, tp1, reference_greedy(hf, prompt, MAX_TOKENS)[1])


def _tp1_engine(uri: str) -> Any:
    from piggyback_runtime.engine import Engine

    return Engine(_scenario_config(uri, 1, "priority", True))


def _tp1_tokens(base: Any, policy: str, chunked: bool) -> list[list[int]]:
    from piggyback_runtime.engine import Engine

    # tp 1 on the accelerator path: the piggyback path gives these tokens too (tests/runtime/test_oracle.py).
    engine = Engine(_scenario_config(base.config.model.uri, 1, "priority", chunked), loaded=base.loaded)
    requests = [make_request(f"r{i}", p, greedy(MAX_TOKENS), c)
                for i, (p, c) in enumerate(zip(PROMPTS, CLASSES, strict=True))]  # fmt: skip
    for request in requests:
        engine.add_request(request)
    run_to_completion(engine)
    engine.close()
    return [r.output_token_ids for r in requests]


# --- a rank lost -----------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_killed_rank_fails_requests_in_flight_reports_not_ready_and_exits_non_zero(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(cpu_attention.ENV_BACKEND, "torch")  # no native kernel build inside the measured window
    port = free_port()
    config = RuntimeConfig.from_dict({
        "model": {"uri": "synthetic://tiny-llama", "max_model_len": 2048},
        "device": "cpu",
        "services": [{"name": "chat", "class": "LS", "slo": LS_SLO}],
        "engine": {"block_size": 16, "num_kv_blocks": 256, "max_num_batched_tokens": 64, "max_num_seqs": 64,
                   "policy": "priority", "tensor_parallel_size": 2},
        "slo_control": {"enabled": False},
        "server": {"host": "127.0.0.1", "port": port},
    })  # fmt: skip
    log_path = tmp_path / "runtime.log"
    process = start_server(config, tmp_path, log_path, log_level="INFO")  # the rank's pid is an INFO line
    base = f"http://127.0.0.1:{port}"
    events: list[str] = []
    started = threading.Event()

    def stream() -> None:
        body = {"model": "chat", "prompt": "tell a long story", "max_tokens": 1900, "ignore_eos": True,
                "temperature": 0, "stream": True}  # fmt: skip
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if line:
                    events.append(line.removeprefix("data: "))
                    started.set()

    try:
        wait_ready(base, process, timeout_s=120)
        match = re.search(r"tensor-parallel rank 1: pid (\d+)", log_path.read_text(errors="replace"))
        assert match, log_path.read_text(errors="replace")[-2000:]
        reader = threading.Thread(target=stream)
        reader.start()
        assert started.wait(60), f"the stream never started (exit code {process.poll()})"
        subprocess.run(["kill", "-9", match.group(1)], check=True)
        reader.join(30)
        assert not reader.is_alive(), "the stream hung after the rank died"
        ready = httpx.get(f"{base}/readyz", timeout=5)
        assert ready.status_code == 503 and "tensor-parallel rank" in ready.text
        returncode = process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert returncode not in (0, None), log_path.read_text(errors="replace")[-3000:]
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert "error" in last and "tensor-parallel rank" in last["error"]["message"], last
    text = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-2] if json.loads(e).get("choices"))
    assert text, "nothing streamed before the rank died"


# --- a CPU attention worker lost on one rank --------------------------------------------------------------------------
class _TwoRanks:
    """The control group's MIN all-reduce between two in-process "ranks" (threads)."""

    def __init__(self) -> None:
        self.barrier = threading.Barrier(2)
        self.values: list[list[int]] = [[], []]

    def agree(self, rank: int) -> Any:
        def agree_min(values: list[int]) -> list[int]:
            self.values[rank] = values
            self.barrier.wait(timeout=10)
            agreed = [min(pair) for pair in zip(*self.values, strict=True)]  # unequal lists: the ranks parted
            self.barrier.wait(timeout=10)
            return agreed

        return agree_min


def _rank_path(rank: int, ranks: _TwoRanks) -> Any:
    """A piggyback path's row bookkeeping (no workers): rows a (entering), b (entering), c (waiting at layer 3)."""
    from piggyback_runtime.piggyback.be_path import ENTER, WAITING, BERow, PiggybackPath

    pb = PiggybackPath.__new__(PiggybackPath)
    pb.rows, pb.failed, pb.max_rows_per_layer, pb.agree, pb.num_layers = {}, [], 8, ranks.agree(rank), 2
    for slot, (rid, state, layer) in enumerate((("a", ENTER, 0), ("b", ENTER, 0), ("c", WAITING, 3))):
        pb.rows[rid] = BERow(make_request(rid, [1], greedy(4), "BE"), slot, 0, 0, layer=layer, state=state)
    return pb


def test_a_row_one_rank_lost_fails_on_every_rank_when_it_would_enter_or_merge() -> None:
    ranks = _TwoRanks()
    paths = [_rank_path(0, ranks), _rank_path(1, ranks)]
    paths[1].rows["a"].lost = paths[1].rows["c"].lost = "the CPU attention worker holding this request died"
    paths[0].rows["c"].state = "ready"  # rank 0's result for c is in; rank 1 lost c
    entered: list[list[str]] = [[], []]
    merged: list[list[str]] = [[], []]

    def run(rank: int) -> None:
        entered[rank] = [row.request.request_id for row in paths[rank].entering()]
        merged[rank] = [row.request.request_id for row in paths[rank]._ready_among(list(paths[rank].rows.values()))]

    threads = [threading.Thread(target=run, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
    assert entered == [["b"], ["b"]] and merged == [[], []]
    for pb in paths:
        assert pb.rows["a"].state == pb.rows["c"].state == "failed" and pb.rows["b"].state == "enter"
    failed = dict((request.request_id, reason) for request, reason in paths[0].take_failures())
    assert set(failed) == {"a", "c"} and all("died on another tensor-parallel rank" in r for r in failed.values())


def _cpu_workers_of(pid: int) -> list[int]:
    """The CPU attention worker processes a rank started (its spawned children; not the resource tracker)."""
    workers = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == pid and b"spawn_main" in cmdline:
            workers.append(int(entry.name))
    return workers


def _dead(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def _kill_a_follower_worker_between_tokens(results: Any) -> None:
    """Rank 0 in a fresh process: two LS and two BE requests on tp 2 (piggyback, one CPU worker per rank); once
    the BE requests decode on the CPU path and a row is between tokens, the test lets every CPU task in flight
    land (between steps nothing new is sent) and kills rank 1's worker. For a few iterations no BE row may enter
    or merge (the planner's budget says 0), so that rank 1 finds the death while its rows wait to enter layer 0
    or to merge: the case where the ranks' rows parted.

    Why not wait for both rows to be between tokens at once: rows enter layer 0 one per iteration (spread over
    the layers), so in lock-step they finish their tokens in alternate iterations and rarely both wait at a
    step's end; a wait for that failed on a slower CI machine."""
    import os
    import signal

    from piggyback_runtime.engine import Engine
    from piggyback_runtime.piggyback.be_path import ENTER, WAITING

    try:
        engine = Engine(_scenario_config("synthetic://tiny-llama", 2, "piggyback", False))
        try:
            assert engine.ranks is not None and engine.piggyback is not None
            pb, schedule = engine.piggyback, engine.planner.schedule
            hold_be = [0]

            def schedule_holding_be(*args: Any, **kwargs: Any) -> Any:
                plan = schedule(*args, **kwargs)
                if hold_be[0]:
                    hold_be[0] -= 1
                    plan.be_rows_per_layer = 0
                return plan

            engine.planner.schedule = schedule_holding_be  # type: ignore[method-assign]
            ls = [make_request(f"ls{i}", PROMPTS[2 * i], greedy(40)) for i in range(2)]
            be = [make_request(f"be{i}", PROMPTS[1 + 2 * i], greedy(40), "BE") for i in range(2)]
            for request in ls + be:
                engine.add_request(request)
            killed = None
            for _ in range(3000):
                if not engine.has_work():
                    break
                engine.step()
                between_tokens = len(pb.rows) == 2 and any(r.state == ENTER for r in pb.rows.values())
                if killed is None and between_tokens and all(len(r.output_token_ids) >= 3 for r in be):
                    while any(r.state == WAITING for r in pb.rows.values()):  # rank 0's tasks land
                        pb.idle_wait(0.01)
                        pb.collect()
                    threading.Event().wait(0.2)  # rank 1's, sent in the same iteration, too
                    (killed,) = _cpu_workers_of(engine.ranks.followers[0].pid)
                    os.kill(killed, signal.SIGKILL)
                    while not _dead(killed):
                        threading.Event().wait(0.01)
                    hold_be[0] = 4
            assert killed is not None, "the BE rows never were between tokens"
            outcome = {r.request_id: (r.finish_reason, r.error, list(r.output_token_ids)) for r in ls + be}
            # The runtime stays ready: the same LS prompts and a new BE request run to the end.
            again = [make_request(f"again-ls{i}", PROMPTS[2 * i], greedy(40)) for i in range(2)]
            again.append(make_request("again-be", PROMPTS[1], greedy(12), "BE"))
            for request in again:
                engine.add_request(request)
            run_to_completion(engine)
            after = {r.request_id: (r.finish_reason, r.error, list(r.output_token_ids)) for r in again}
            results.put(("ok", outcome, after, engine.fatal_reason))
        finally:
            engine.close()
    except BaseException as exc:  # reported to the test
        results.put(("error", repr(exc), None, None))


@pytest.mark.slow
def test_a_cpu_worker_killed_between_tokens_on_another_rank_fails_its_be_requests_on_every_rank(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Rank 1 loses its CPU worker (its KV-head shard of the BE requests' host KV) between tokens. The ranks agree
    on the loss: the BE requests end with an error event, the LS requests are untouched, nothing hangs and the
    runtime stays ready (a new BE request runs on the replaced worker)."""
    monkeypatch.setenv(cpu_attention.ENV_BACKEND, "torch")
    results = mp.get_context("spawn").Queue()
    process = mp.get_context("spawn").Process(target=_kill_a_follower_worker_between_tokens, args=(results,))
    process.start()
    try:
        status, outcome, after, fatal = results.get(timeout=300)  # a hang fails here
    finally:
        process.join(timeout=30)
        if process.is_alive():
            process.kill()
    assert status == "ok", outcome
    assert fatal is None
    for rid in ("be0", "be1"):
        reason, error, _ = outcome[rid]
        assert reason == "error" and "worker holding this request died on another tensor-parallel rank" in error
    for i in range(2):
        reason, _, tokens = outcome[f"ls{i}"]
        assert reason == "length" and len(tokens) == 40
        assert after[f"again-ls{i}"][2] == tokens, "the LS requests' tokens changed"
    assert after["again-be"][0] == "length" and len(after["again-be"][2]) == 12, after["again-be"]


# --- where a rank's CPU workers run ----------------------------------------------------------------------------------
def test_workers_go_to_the_numa_node_of_the_ranks_gpu_where_the_host_has_several(tmp_path: Path) -> None:
    assert numa.parse_cpulist("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11]
    nodes = {0: [0, 1, 2, 3], 1: [4, 5, 6, 7]}
    assert numa.choose_worker_cpus(1, nodes, allowed=set(range(8))) == [4, 5, 6, 7]
    assert numa.choose_worker_cpus(1, nodes, allowed={0, 1, 5}) == [5]  # only what this process may use
    assert numa.choose_worker_cpus(1, nodes, allowed={0, 1}) is None  # nothing allowed there: leave it
    assert numa.choose_worker_cpus(None, nodes, allowed=set(range(8))) is None  # /sys does not say
    assert numa.choose_worker_cpus(0, {0: [0, 1]}, allowed={0, 1}) is None  # one node: nothing to choose

    # The /sys layout: node directories with cpulists; a PCI device's numa_node (-1: unknown).
    for node, cpus in (("node0", "0-1"), ("node1", "2-3")):
        (tmp_path / "nodes" / node).mkdir(parents=True)
        (tmp_path / "nodes" / node / "cpulist").write_text(cpus + "\n")
    (tmp_path / "pci" / "0000:3b:00.0").mkdir(parents=True)
    (tmp_path / "pci" / "0000:3b:00.0" / "numa_node").write_text("1\n")
    (tmp_path / "pci" / "0000:af:00.0").mkdir(parents=True)
    (tmp_path / "pci" / "0000:af:00.0" / "numa_node").write_text("-1\n")
    assert numa.read_nodes(tmp_path / "nodes") == {0: [0, 1], 1: [2, 3]}
    assert numa.read_pci_numa_node("0000:3B:00.0", tmp_path / "pci") == 1
    assert numa.read_pci_numa_node("0000:af:00.0", tmp_path / "pci") is None
    assert numa.read_pci_numa_node("0000:00:00.0", tmp_path / "pci") is None


# --- what crosses the link -------------------------------------------------------------------------------------------
class _RecordingGroup(TensorParallelGroup):
    """Rank 0 of 2 with the collectives recorded instead of run (the sums come out wrong; only sizes count)."""

    def __init__(self) -> None:
        super().__init__(0, 2, None)
        self.all_reduced: list[int] = []
        self.gathered: list[int] = []

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        self.all_reduced.append(tensor.numel() * tensor.element_size())
        return tensor

    def all_gather_last_dim(self, tensor: torch.Tensor) -> torch.Tensor:
        self.gathered.append(tensor.numel() * tensor.element_size())
        return tensor.repeat(1, self.world_size)


def test_the_bytes_a_rank_all_reduces_per_layer_are_the_simulators() -> None:
    group = _RecordingGroup()
    loaded = loader.load_model(tiny_config().model, "cpu", group)
    arch, tokens = loaded.arch, 5
    hidden = loaded.model.forward_layers(torch.arange(tokens), torch.arange(tokens),
                                         lambda _, q, k, v: torch.zeros_like(q))  # fmt: skip
    embedding, *layers = group.all_reduced
    assert embedding == tokens * tp_allreduce_message_bytes(arch.hidden_size, 4)
    per_layer = allreduce_bytes_per_token_layer(arch.hidden_size, 4)  # fp32 here; the simulator's bf16 is 2
    assert sum(layers) == arch.num_hidden_layers * tokens * per_layer
    assert len(layers) == arch.num_hidden_layers * TP_ALLREDUCES_PER_LAYER
    loaded.model.compute_logits(hidden[-2:])
    assert group.gathered == [2 * (padded_vocab(arch.vocab_size, 2) // 2) * 4]  # fp32 logits, this rank's half
