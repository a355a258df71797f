"""The simulator's device side: presets against the Vidur CSVs, the built latency model, the truth, capacities."""

from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path

import pytest

from piggyback_runtime.scheduler.latency_model import (
    LatencyModel,
    LinearAttentionModel,
    ProfileKey,
    StaircaseModel,
    Step,
    prefill_chunk_load,
)
from piggyback_runtime.sim.devices import (
    GPUS,
    HOSTS,
    MODELS,
    REMOTE_1G4C,
    VIDUR_DIR_ENV,
    DeviceProfile,
    HostSpec,
    ModelShape,
    build_gpu_profile,
    default_vidur_dir,
    load_runtime_profile,
    read_all_reduce,
    read_dense_profile,
    resolve_model,
    vidur_shape_mismatches,
)

VIDUR = default_vidur_dir()


@pytest.fixture
def vidur() -> Path:
    if not (VIDUR / "profiling").is_dir():
        pytest.skip(f"Vidur data not found at {VIDUR} (expected ../shared/data/vidur or ${VIDUR_DIR_ENV})")
    return VIDUR


def _first_row(path: Path) -> dict[str, str]:
    with path.open(newline="") as f:
        return next(csv.DictReader(f))


# --- presets vs data ---------------------------------------------------------------------------------------------
def test_presets_match_the_csv_shape_columns(vidur: Path) -> None:
    checked = 0
    for shape, gpu in itertools.product(MODELS.values(), ("h100", "a100")):
        assert shape.vidur_dir is not None
        path = vidur / "profiling" / "compute" / gpu / shape.vidur_dir / "mlp.csv"
        if path.is_file():
            assert vidur_shape_mismatches(shape, _first_row(path)) == [], (shape.name, gpu)
            checked += 1
    assert checked == 7  # 4 models on A100, 3 on H100 (no Llama-3-8B)


def test_a_preset_that_differs_from_the_csv_is_refused(vidur: Path) -> None:
    wrong = ModelShape("bad", 80, 8192, 22016, 64, 8, 128, 32000, vidur_dir="meta-llama/Llama-2-70b-hf")
    with pytest.raises(ValueError, match="n_expanded_embd is 28672"):
        read_dense_profile(vidur, "h100", wrong, 4)


def test_dense_readback_matches_the_readme_example(vidur: Path) -> None:
    per_layer = dict(read_dense_profile(vidur, "h100", MODELS["llama-2-70b"], 4))
    for tokens, ms in ((1, 0.18), (64, 0.19), (512, 0.38), (4096, 2.8)):
        assert per_layer[tokens] * 1e3 == pytest.approx(ms, rel=0.15), tokens
    assert len(per_layer) == 259
    assert min(per_layer) == 1 and max(per_layer) == 4096


def test_yi_34b_is_the_codellama_34b_shape() -> None:
    assert resolve_model("Yi-34B") is MODELS["codellama-34b"]
    shape = MODELS["codellama-34b"]
    assert (shape.num_layers, shape.hidden_size, shape.num_heads, shape.num_kv_heads) == (48, 8192, 64, 8)


# --- errors -----------------------------------------------------------------------------------------------------
def test_bad_model_gpu_and_tp_name_the_options(vidur: Path) -> None:
    with pytest.raises(ValueError, match=r"llama-2-70b.*yi-34b"):
        build_gpu_profile("h100", "gpt-5", data_dir=vidur)
    with pytest.raises(ValueError, match="a100-80gb, h100"):
        build_gpu_profile("v100", "llama-2-7b", data_dir=vidur)
    with pytest.raises(ValueError, match=r"mlp.csv: no rows for TP 3; TP degrees measured: \[1, 2, 4, 8\]"):
        build_gpu_profile("h100", "llama-2-7b", tp=3, data_dir=vidur)
    with pytest.raises(ValueError, match=r"all_reduce.csv: no rows for TP 8; worker counts measured: \[2, 4\]"):
        build_gpu_profile("h100", "llama-2-7b", tp=8, data_dir=vidur, topology="pairwise_nvlink")
    with pytest.raises(ValueError, match=r"Meta-Llama-3-8B/mlp\.csv: no such file"):
        build_gpu_profile("h100", "llama-3-8b", data_dir=vidur)


def test_missing_column_is_named(tmp_path: Path, vidur: Path) -> None:
    shape = MODELS["llama-2-7b"]
    source = vidur / "profiling" / "compute" / "a100" / str(shape.vidur_dir) / "mlp.csv"
    target = tmp_path / "profiling" / "compute" / "a100" / str(shape.vidur_dir) / "mlp.csv"
    target.parent.mkdir(parents=True)
    with source.open(newline="") as f:
        rows = list(itertools.islice(csv.DictReader(f), 5))
    columns = [c for c in rows[0] if c != "time_stats.mlp_act.median"]
    with target.open("w", newline="") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(ValueError, match=r"mlp.csv: missing column\(s\) time_stats.mlp_act.median"):
        read_dense_profile(tmp_path, "a100", shape, 1)


def test_data_dir_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(VIDUR_DIR_ENV, str(tmp_path))
    assert default_vidur_dir() == tmp_path
    with pytest.raises(ValueError, match=str(tmp_path)):
        build_gpu_profile("h100", "llama-2-7b")  # nothing there


# --- the built latency model ---------------------------------------------------------------------------------------
@pytest.fixture
def h100_70b(vidur: Path) -> DeviceProfile:
    return build_gpu_profile("h100", "llama-2-70b", tp=4, data_dir=vidur)


def test_latency_model_is_monotone_in_each_argument(h100_70b: DeviceProfile) -> None:
    lm = h100_70b.latency_model
    grid = [0, 1, 7, 64, 100, 255, 256, 257, 1000, 4096, 5000, 20000]
    base = (128.0, 1e5, 1e5, 16.0)
    for arg in range(4):
        values = []
        for x in grid:
            args = list(base)
            args[arg] = x * (100 if arg in (1, 2) else 1)  # loads are (query, key) pairs: larger numbers
            values.append(lm.predict_parts(*args))
        assert all(a <= b for a, b in itertools.pairwise(values)), (arg, values)
        assert values[-1] > values[1], arg  # and it does grow


def test_tp_all_reduce_adds_time(vidur: Path, h100_70b: DeviceProfile) -> None:
    shape = h100_70b.shape
    per_layer = dict(read_dense_profile(vidur, "h100", shape, 4))
    for tokens in (1, 64, 512, 4096):
        no_all_reduce = shape.num_layers * per_layer[tokens]
        assert h100_70b.latency_model.dense.predict(tokens) > no_all_reduce * 1.02, tokens
    assert read_all_reduce(vidur, "h100", 1)(1 << 20) == 0.0
    all_reduce = read_all_reduce(vidur, "h100", 4)
    sizes = [2048, 1 << 16, 1 << 20, 1 << 24, 1 << 26, 1 << 28]  # the last beyond the measured range
    times = [all_reduce(s) for s in sizes]
    assert times[0] > 0
    assert all(a <= b for a, b in itertools.pairwise(times))
    assert times[-1] > 2 * times[-2]  # bandwidth-bound: linear in size beyond the range


@pytest.mark.slow  # seconds: fits device profiles from Vidur's tables
def test_h100_is_faster_than_a100(vidur: Path, h100_70b: DeviceProfile) -> None:
    a100 = build_gpu_profile("a100-80gb", "llama-2-70b", tp=4, data_dir=vidur)
    for rows, prefill, decode in ((1, 0, 2000), (256, 0, 256 * 2000), (2048, prefill_chunk_load(0, 2048), 0)):
        assert h100_70b.latency_model.predict_parts(rows, prefill, decode, rows) < a100.latency_model.predict_parts(
            rows, prefill, decode, rows
        )


def test_analytic_attention_follows_the_datasheet(h100_70b: DeviceProfile) -> None:
    attention = h100_70b.latency_model.attention
    # 80 layers × 2 × 8 kv heads × 128 × 2 bytes, a quarter per GPU, at 70% of 3350 GB/s.
    assert attention.per_decode_load == pytest.approx(327680 / 4 / (3350e9 * 0.7))
    assert attention.per_prefill_load == pytest.approx(4 * 64 * 128 * 80 / 4 / (989e12 * 0.5))
    assert attention.intercept == pytest.approx(80 * 5e-6)


@pytest.mark.slow  # seconds: fits device profiles from Vidur's tables
def test_tp_makes_a_big_batch_faster(vidur: Path) -> None:
    tp1 = build_gpu_profile("h100", "llama-2-7b", tp=1, data_dir=vidur)
    tp2 = build_gpu_profile("h100", "llama-2-7b", tp=2, data_dir=vidur)
    assert tp2.latency_model.dense.predict(4096) < tp1.latency_model.dense.predict(4096)
    assert tp2.latency_model.overhead_s > tp1.latency_model.overhead_s == pytest.approx(1.5e-3)


# --- the simulated truth -----------------------------------------------------------------------------------------
def test_mixed_decode_contexts_run_slower_than_homogeneous(h100_70b: DeviceProfile) -> None:
    homogeneous = [2000] * 8
    mixed = [250] * 7 + [14250]  # same sum
    assert sum(mixed) == sum(homogeneous)
    predicted = h100_70b.latency_model.predict_parts(64, 0, sum(homogeneous), 8)
    assert h100_70b.iteration_s(64, 0, homogeneous, 8) == pytest.approx(predicted)
    slower = h100_70b.iteration_s(64, 0, mixed, 8)
    base_attention = h100_70b.latency_model.attention.per_decode_load * sum(mixed)
    assert slower - predicted == pytest.approx(base_attention * 0.5 * (1 - 2000 / 14250))
    exact = DeviceProfile(h100_70b.gpu, h100_70b.host, h100_70b.shape, 4, h100_70b.latency_model, mixing_penalty=0)
    assert exact.iteration_s(64, 0, mixed, 8) == pytest.approx(predicted)
    assert h100_70b.iteration_s(64, 0, [], 8) == pytest.approx(h100_70b.latency_model.predict_parts(64, 0, 0, 8))


def test_layer_time_is_an_even_split(h100_70b: DeviceProfile) -> None:
    assert h100_70b.layer_time_s(0.08) == pytest.approx(0.001)


def test_host_attention_and_transfers(h100_70b: DeviceProfile) -> None:
    # One layer of a 9000-token BE context: 9000 × 2 × 8 kv heads × 128 × 2 bytes, all kv heads on the host.
    assert h100_70b.cpu_task_bytes(9000) == 9000 * 4096
    bandwidth = 2 * 307.2e9 * 0.8
    assert h100_70b.host_attention_bandwidth_b_s() == pytest.approx(bandwidth)
    assert h100_70b.cpu_attention_s(9000) == pytest.approx(20e-6 + 9000 * 4096 / bandwidth)
    assert h100_70b.host_task_overhead_s == pytest.approx(20e-6)
    assert h100_70b.pcie_s(0) == 0.0
    assert h100_70b.pcie_s(200e6) == pytest.approx(5e-6 + 200e6 / (4 * 50e9))
    assert h100_70b.be_qkv_bytes_per_layer() == (64 + 16) * 128 * 2
    assert h100_70b.remote_bandwidth_b_s() == 0.0
    with pytest.raises(ValueError, match="no remote"):
        h100_70b.network_s(1.0)
    remote = DeviceProfile(h100_70b.gpu, h100_70b.host, h100_70b.shape, 4, h100_70b.latency_model, remote=REMOTE_1G4C)
    assert remote.remote_bandwidth_b_s() == pytest.approx(4 * 409.6e9 * 0.8)
    assert remote.network_s(50e9) == pytest.approx(10e-6 + 4.0)  # one message crosses one 12.5 GB/s link
    assert remote.host_kv_capacity_tokens() > h100_70b.host_kv_capacity_tokens()


def test_kv_capacities_are_sane(vidur: Path) -> None:
    shape = MODELS["llama-2-70b"]
    assert shape.weight_bytes() == pytest.approx(138e9, rel=0.02)
    assert shape.kv_bytes_per_token() == 80 * 2 * 8 * 128 * 2
    profile = build_gpu_profile("a100-80gb", "llama-2-70b", tp=4, data_dir=vidur)
    tokens = profile.gpu_kv_capacity_tokens()
    assert tokens == pytest.approx((4 * 80 * 2**30 * 0.9 - shape.weight_bytes()) / 327680, abs=1)
    assert 300_000 < tokens < 800_000
    assert profile.gpu_kv_capacity_tokens(0.5) < tokens
    assert profile.host_kv_capacity_tokens() == int(1024 * 2**30 * 0.8 // 327680)  # DGX A100 host, 1 TiB
    # A 70B model does not fit on one GPU at all.
    one = DeviceProfile(GPUS["a100-80gb"], HOSTS["dgx-a100"], shape, 1, profile.latency_model)
    assert one.gpu_kv_capacity_tokens() == 0
    assert MODELS["llama-2-7b"].weight_bytes() == pytest.approx(13.5e9, rel=0.02)


# --- profiles measured on this machine --------------------------------------------------------------------------
def _tiny_model() -> LatencyModel:
    return LatencyModel(
        dense=StaircaseModel((Step(1, 16, 0.01), Step(32, 64, 0.02)), 0, 1e-4),
        attention=LinearAttentionModel(1e-4, 1e-8, 2e-8),
        logits=None,
        overhead_s=2e-3,
    )


def test_runtime_profile_round_trip(tmp_path: Path) -> None:
    model = _tiny_model()
    path = model.save(tmp_path / "p.json", ProfileKey("hf://tiny", "float32", "CPU test (4 cores)", "abc"))
    host = HostSpec(cores=4, sockets=1, dram_bandwidth_gb_s_per_socket=36, dram_gib=32)
    shape = MODELS["llama-2-7b"]
    profile = load_runtime_profile(path, shape, host)
    assert profile.latency_model == model
    assert profile.gpu.name == "CPU test (4 cores)"
    assert profile.mixing_penalty == 0
    assert profile.pcie_s(1e9) == 0.0
    mixed = [10, 10, 10, 3000]
    assert profile.iteration_s(20, 0, mixed, 4) == pytest.approx(model.predict_parts(20, 0, sum(mixed), 4))
    assert profile.cpu_task_bytes(100) == 100 * shape.kv_bytes_per_token_per_layer()


def test_bad_runtime_profile_file(tmp_path: Path) -> None:
    host = HOSTS["dgx-a100"]
    shape = MODELS["llama-2-7b"]
    with pytest.raises(ValueError, match="cannot read"):
        load_runtime_profile(tmp_path / "absent.json", shape, host)
    (tmp_path / "garbage.json").write_text("{not json")
    with pytest.raises(ValueError, match="not JSON"):
        load_runtime_profile(tmp_path / "garbage.json", shape, host)
    (tmp_path / "other.json").write_text(json.dumps({"model": _tiny_model().to_dict()}))
    with pytest.raises(ValueError, match="not a `piggyback profile` file"):
        load_runtime_profile(tmp_path / "other.json", shape, host)
