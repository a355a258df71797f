"""The device side of the discrete-event simulator: hardware, model shapes, and iteration timings.

Pure Python (stdlib csv, no torch / numpy): the simulator drives the runtime's own planner in simulated time,
and the planner predicts an iteration with `LatencyModel` (scheduler/latency_model.py). This module builds
that `LatencyModel` for a real GPU from measured Vidur operator timings (see ../shared/data/vidur/README.md,
microsoft/vidur commit 7d47513, MIT licence) and adds what the planner does not model: the "true" duration
of a simulated iteration, host (CPU) attention, PCIe and network transfers, and KV capacities.

What is measured and what is assumed:
- Dense (pre/post-attention) time per layer and TP all-reduce time: **measured** (Vidur CSVs).
- Attention on the GPU: **not** in the Vidur data; modelled analytically (decode reads KV at a stated share
  of HBM bandwidth, prefill runs FLOPs at a stated share of peak). lm_head: analytic too.
- GPU / host figures: public datasheet numbers; every efficiency is a stated assumption.

Units follow latency_model.py: a dense row is one token through all layers, attention load counts
(query, key) pairs, decode load is the sum of context lengths.
"""

from __future__ import annotations

import bisect
import csv
import json
import math
import os
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from piggyback_runtime.model.arch import (
    TP_ALLREDUCES_PER_LAYER,
    ModelArch,
    synthetic_arch,
    tp_allreduce_message_bytes,
)
from piggyback_runtime.remote_capacity import KV_SHARE_OF_DRAM, PAPER_CPU_NODE, RemoteNodeFigures
from piggyback_runtime.scheduler.latency_model import LatencyModel, LinearAttentionModel, StaircaseModel, isotonic

GIB = 1 << 30
GB = 1e9
VIDUR_DIR_ENV = "PIGGYBACK_VIDUR_DIR"


# --- hardware -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GPUSpec:
    """One accelerator (one GPU of a TP group).

    The bandwidth / FLOP figures are vendor datasheet numbers; the two efficiencies are assumptions (the
    share of that peak a real attention kernel reaches), since attention is not in the measured data.
    """

    name: str
    hbm_gib: float  # device memory per GPU
    hbm_bandwidth_gb_s: float  # HBM read bandwidth, GB/s (1e9 bytes/s)
    peak_dense_tflops: float  # bf16 dense tensor-core peak, TFLOP/s (no sparsity)
    pcie_gb_s: float  # host<->device, per direction, effective GB/s (math.inf: no transfer cost)
    decode_attention_bandwidth_efficiency: float = 0.7  # share of HBM bandwidth decode attention reaches
    prefill_attention_flops_efficiency: float = 0.5  # share of peak FLOPs prefill attention reaches
    pcie_latency_s: float = 5e-6  # fixed cost of one DMA transfer (launch + completion)
    vidur_name: str = ""  # the folder of profiling/compute holding its timings ("" if none)

    def hbm_bandwidth_b_s(self) -> float:
        return self.hbm_bandwidth_gb_s * GB

    def peak_flops(self) -> float:
        return self.peak_dense_tflops * 1e12


# Datasheet figures (NVIDIA A100 / H100 SXM datasheets); the PCIe numbers are typical effective rates of
# gen4 x16 / gen5 x16 links, not the raw 32 / 64 GB/s. Efficiencies are the dataclass defaults (assumptions).
GPUS: dict[str, GPUSpec] = {
    "a100-80gb": GPUSpec(
        name="a100-80gb",
        hbm_gib=80,
        hbm_bandwidth_gb_s=2039,
        peak_dense_tflops=312,
        pcie_gb_s=25,
        vidur_name="a100",
    ),
    "h100": GPUSpec(
        name="h100",
        hbm_gib=80,
        hbm_bandwidth_gb_s=3350,
        peak_dense_tflops=989,
        pcie_gb_s=50,
        vidur_name="h100",
    ),
}
# Names of the Vidur folders accepted as aliases of the presets.
_GPU_ALIASES = {"a100": "a100-80gb", "h100-80gb": "h100"}


@dataclass(frozen=True)
class HostSpec:
    """The CPU host of a GPU node, which runs BE attention against BE KV held in its DRAM.

    cpu_attention_efficiency: the share of DRAM read bandwidth the CPU attention kernel reaches (0.8 is what
    benchmarks/cpu_attention.py measures, benchmarks/results/cpu_attention.md: 80-91% of the roofline).
    per_task_overhead_s: fixed cost of one CPU attention task (dispatch, gather of pages), an assumption.
    """

    cores: int
    sockets: int
    dram_bandwidth_gb_s_per_socket: float
    dram_gib: float
    cpu_attention_efficiency: float = 0.8
    per_task_overhead_s: float = 20e-6

    def attention_bandwidth_b_s(self) -> float:
        """Bytes of KV per second the whole host's CPU attention reads (all sockets)."""
        return self.sockets * self.dram_bandwidth_gb_s_per_socket * GB * self.cpu_attention_efficiency


# Datasheet figures of the DGX hosts: DGX A100 = 2 × AMD EPYC 7742 (64 cores, 8 × DDR4-3200 = 204.8 GB/s
# per socket), 1 TiB; DGX H100 = 2 × Xeon Platinum 8480C (56 cores, 8 × DDR5-4800 = 307.2 GB/s), 2 TiB.
HOSTS: dict[str, HostSpec] = {
    "dgx-a100": HostSpec(cores=128, sockets=2, dram_bandwidth_gb_s_per_socket=204.8, dram_gib=1024),
    "dgx-h100": HostSpec(cores=112, sockets=2, dram_bandwidth_gb_s_per_socket=307.2, dram_gib=2048),
}
# The host a GPU preset gets when build_gpu_profile is given none.
DEFAULT_HOST_FOR_GPU: dict[str, str] = {"a100-80gb": "dgx-a100", "h100": "dgx-h100"}


@dataclass(frozen=True)
class RemoteCPUNodes:
    """CPU-only nodes that hold BE KV and run BE attention over the network (OmniServe's "1G4C": one GPU
    node plus 4 CPU-only nodes)."""

    count: int
    cores_per_node: int
    dram_bandwidth_gb_s_per_node: float  # all sockets of one node, GB/s
    dram_gib_per_node: float
    network_gb_s: float  # per-node link, GB/s (100 Gbps = 12.5 GB/s)
    network_latency_s: float = 10e-6  # one message, one way (RDMA-class NIC; an assumption)

    def node(self) -> RemoteNodeFigures:
        """One node's figures in the form the runtime's remote pool and the planner use (remote_capacity.py)."""
        return RemoteNodeFigures(self.cores_per_node, self.dram_bandwidth_gb_s_per_node, self.dram_gib_per_node,
                                 self.network_gb_s, self.network_latency_s)  # fmt: skip

    @classmethod
    def of(cls, count: int, node: RemoteNodeFigures) -> RemoteCPUNodes:
        return cls(count, node.cores, node.dram_bandwidth_gb_s, node.dram_gib, node.network_gb_s,
                   node.network_latency_s)  # fmt: skip


# 1G4C as in the OmniServe paper: 4 dual-socket CPU nodes on 100 Gbps links; the per-node figures
# (remote_capacity.PAPER_CPU_NODE, an assumption: a DGX-A100-class host) are the runtime's too.
REMOTE_1G4C = RemoteCPUNodes.of(4, PAPER_CPU_NODE)


# --- model shapes ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelShape:
    """A decoder-only transformer with a gated (SwiGLU) MLP and grouped-query attention."""

    name: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    dtype_bytes: int = 2
    vidur_dir: str | None = None  # folder under profiling/compute/{gpu}/ with its measured timings

    @classmethod
    def from_arch(cls, name: str, arch: ModelArch, vidur_dir: str | None = None) -> ModelShape:
        return cls(name, arch.num_hidden_layers, arch.hidden_size, arch.intermediate_size, arch.num_attention_heads,
                   arch.num_key_value_heads, arch.head_dim, arch.vocab_size, vidur_dir=vidur_dir)  # fmt: skip

    def kv_bytes_per_token_per_layer(self) -> int:
        """K and V of one token in one layer, all kv heads (the whole model, not one TP shard)."""
        return 2 * self.num_kv_heads * self.head_dim * self.dtype_bytes

    def kv_bytes_per_token(self) -> int:
        """K and V of one token over all layers."""
        return self.num_layers * self.kv_bytes_per_token_per_layer()

    def parameter_count(self) -> int:
        """Approximate: attention + gated MLP + 2 norms per layer, untied embedding and lm_head, final norm."""
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        attention = h * q + 2 * h * kv + q * h
        mlp = 3 * h * self.intermediate_size  # gate, up, down
        per_layer = attention + mlp + 2 * h
        return self.num_layers * per_layer + 2 * self.vocab_size * h + h

    def weight_bytes(self) -> int:
        return self.parameter_count() * self.dtype_bytes


# The shapes are the runtime's synthetic presets (model/arch.py: one place for architectures); the folders
# are where ../shared/data/vidur keeps each one's measured timings.
VIDUR_DIRS: dict[str, str] = {
    "llama-2-7b": "meta-llama/Llama-2-7b-hf",
    "llama-2-70b": "meta-llama/Llama-2-70b-hf",
    "codellama-34b": "codellama/CodeLlama-34b-Instruct-hf",
    "llama-3-8b": "meta-llama/Meta-Llama-3-8B",
}
MODELS: dict[str, ModelShape] = {
    name: ModelShape.from_arch(name, synthetic_arch(name), folder) for name, folder in VIDUR_DIRS.items()
}
MODEL_ALIASES: dict[str, str] = {"yi-34b": "codellama-34b"}


def resolve_model(name: str) -> ModelShape:
    key = MODEL_ALIASES.get(name.lower(), name.lower())
    if key not in MODELS:
        known = ", ".join([*MODELS, *MODEL_ALIASES])
        raise ValueError(f"unknown model {name!r}; known models: {known}")
    return MODELS[key]


def vidur_compute_dir(data_dir: str | Path | None, gpu: str) -> Path:
    """profiling/compute/<gpu>/ of the Vidur data: one folder per model (org/name), each with an mlp.csv."""
    return _data_dir(data_dir) / "profiling" / "compute" / _vidur_gpu_name(gpu)


def _read_hf_config(config: Path) -> dict[str, Any]:
    try:
        cfg = json.loads(config.read_text())
    except OSError as e:
        raise ValueError(f"{config}: cannot read it: {e}") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{config}: not JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"{config}: not a Hugging Face config (a JSON object)")
    return cfg


def resolve_vidur_model(
    model: str, gpu: str, data_dir: str | Path | None = None, vidur_model: str | None = None
) -> ModelShape:
    """The shape of `model` and the folder under profiling/compute/<gpu>/ that holds its Vidur timings.

    `model` is one of:
    - a preset name (resolve_model: llama-2-70b, ...); `vidur_model` then replaces its folder;
    - a folder with a Hugging Face config.json (a path, or file://PATH): the shape from config.json, the
      timings from the folder `vidur_model` names, else the config's `_name_or_path` (what Hugging Face
      writes there when a model is downloaded: "meta-llama/Meta-Llama-3-8B");
    - a model name as the Vidur data lays it out ("meta-llama/Meta-Llama-3-8B"): the preset with that folder,
      else the shape from a config.json in that folder of the data.
    A missing piece is a ValueError naming the path looked at. Whether the timings exist for this GPU and TP
    degree, and match the shape, read_dense_profile checks.
    """
    if model.startswith("file://") or Path(model).is_dir():
        folder = Path(model.removeprefix("file://")).expanduser()
        config = folder / "config.json"
        if not config.is_file():
            raise ValueError(f"{config}: no such file (device.model names a folder: it needs the model's Hugging "
                             "Face config.json for its shape)")  # fmt: skip
        cfg = _read_hf_config(config)
        arch = ModelArch.from_hf_config(cfg, str(config))
        vidur_dir = vidur_model or cfg.get("_name_or_path")
        if not vidur_dir or not isinstance(vidur_dir, str):
            raise ValueError(f"{config}: no _name_or_path to find the model's Vidur timings by; set device."
                             f"vidur_model to its folder under {vidur_compute_dir(data_dir, gpu)}")  # fmt: skip
        return ModelShape.from_arch(vidur_dir, arch, vidur_dir)
    if "/" in model:
        by_folder = {str(s.vidur_dir).lower(): s for s in MODELS.values()}
        preset = by_folder.get(model.lower())
        if preset is not None:
            return preset
        config = vidur_compute_dir(data_dir, gpu) / model / "config.json"
        if not config.is_file():
            presets = ", ".join(sorted(VIDUR_DIRS.values()))
            raise ValueError(f"no shape for model {model!r}: it is no preset's Vidur folder ({presets}) and "
                             f"{config} does not exist; put the model's Hugging Face config.json there, or set "
                             "device.model to a folder with it")  # fmt: skip
        return ModelShape.from_arch(model, ModelArch.from_hf_config(_read_hf_config(config), str(config)), model)
    key = MODEL_ALIASES.get(model.lower(), model.lower())
    if key not in MODELS:
        raise ValueError(f"unknown model {model!r}; known models: {', '.join([*MODELS, *MODEL_ALIASES])}; or a "
                         "folder with a Hugging Face config.json, or a Vidur model name (org/name)")  # fmt: skip
    return MODELS[key] if vidur_model is None else replace(MODELS[key], vidur_dir=vidur_model)


def resolve_gpu(name: str) -> GPUSpec:
    key = _GPU_ALIASES.get(name.lower(), name.lower())
    if key not in GPUS:
        known = ", ".join([*GPUS, *_GPU_ALIASES])
        raise ValueError(f"unknown GPU {name!r}; known GPUs: {known}")
    return GPUS[key]


# --- Vidur data ------------------------------------------------------------------------------------------------
# Per-layer Dense ops of mlp.csv (emb runs once per iteration, not per layer, so it is left out).
DENSE_OPS = (
    "input_layernorm",
    "attn_pre_proj",
    "attn_rope",
    "attn_post_proj",
    "post_attention_layernorm",
    "mlp_up_proj",
    "mlp_act",
    "mlp_down_proj",
    "add",
)
# Vidur pads vocabularies (Llama-2's 32000 is profiled as 32768): the profiled vocab may exceed the real one
# by less than this.
_VOCAB_PADDING = 1024


def default_vidur_dir() -> Path:
    """$PIGGYBACK_VIDUR_DIR, else ../shared/data/vidur next to the repository."""
    env = os.environ.get(VIDUR_DIR_ENV)
    if env:
        return Path(env).expanduser()
    return (Path(__file__).resolve().parents[3] / ".." / "shared" / "data" / "vidur").resolve()


def _data_dir(data_dir: str | Path | None) -> Path:
    return Path(data_dir) if data_dir is not None else default_vidur_dir()


def _read_csv(path: Path, required: Sequence[str]) -> list[dict[str, str]]:
    if not path.is_file():
        raise ValueError(f"{path}: no such file (set {VIDUR_DIR_ENV} or pass data_dir)")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        columns = set(reader.fieldnames or ())
        missing = [c for c in required if c not in columns]
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(missing)}")
        return list(reader)


def vidur_shape_mismatches(shape: ModelShape, row: dict[str, str]) -> list[str]:
    """How a preset differs from the shape columns of a Vidur CSV row (empty: it matches)."""
    expected = {
        "n_head": shape.num_heads,
        "n_kv_head": shape.num_kv_heads,
        "n_embd": shape.hidden_size,
        "n_expanded_embd": shape.intermediate_size,
    }
    problems = [f"{col} is {row[col]}, preset has {want}" for col, want in expected.items() if int(row[col]) != want]
    vocab = int(row["vocab_size"])
    if not shape.vocab_size <= vocab < shape.vocab_size + _VOCAB_PADDING:
        problems.append(f"vocab_size is {vocab}, preset has {shape.vocab_size} (padding up to {_VOCAB_PADDING})")
    if row.get("use_gated_mlp", "True").lower() != "true":
        problems.append("use_gated_mlp is not True, presets assume a gated MLP")
    return problems


def _vidur_gpu_name(gpu: str) -> str:
    spec = resolve_gpu(gpu)
    if not spec.vidur_name:
        raise ValueError(f"GPU {gpu!r} has no Vidur timings")
    return spec.vidur_name


def read_dense_profile(data_dir: str | Path | None, gpu: str, shape: ModelShape, tp: int) -> list[tuple[int, float]]:
    """Measured Dense time of ONE layer per TP worker: sorted [(num_tokens, seconds)], one entry per size.

    Sum of the medians of every per-layer op except emb; repeated rows of one size are merged by median.
    Raises ValueError naming the file for a missing file / column, a shape that differs from the preset,
    or a TP degree with no rows (listing the measured ones).
    """
    if shape.vidur_dir is None:
        raise ValueError(f"model {shape.name!r} has no Vidur timings (vidur_dir is None)")
    compute = vidur_compute_dir(data_dir, gpu)
    path = compute / shape.vidur_dir / "mlp.csv"
    if compute.is_dir() and not path.is_file():  # a missing data folder as a whole: _read_csv says so
        measured = sorted(str(p.parent.relative_to(compute)) for p in compute.glob("*/*/mlp.csv"))
        raise ValueError(f"{path}: no such file: no Vidur timings of {shape.vidur_dir!r} on {gpu}; models "
                         f"measured on it: {', '.join(measured) or 'none'}")  # fmt: skip
    shape_cols = ("n_head", "n_kv_head", "n_embd", "n_expanded_embd", "vocab_size")
    op_cols = [f"time_stats.{op}.median" for op in DENSE_OPS]
    rows = _read_csv(path, [*shape_cols, "num_tokens", "num_tensor_parallel_workers", *op_cols])
    if not rows:
        raise ValueError(f"{path}: no rows")
    problems = vidur_shape_mismatches(shape, rows[0])
    if problems:
        raise ValueError(f"{path}: does not match model {shape.name!r}: {'; '.join(problems)}")
    by_tokens: dict[int, list[float]] = {}
    for row in rows:
        if int(row["num_tensor_parallel_workers"]) == tp:
            ms = sum(float(row[c]) for c in op_cols)
            by_tokens.setdefault(int(row["num_tokens"]), []).append(ms / 1e3)
    if not by_tokens:
        available = sorted({int(r["num_tensor_parallel_workers"]) for r in rows})
        raise ValueError(f"{path}: no rows for TP {tp}; TP degrees measured: {available}")
    return [(n, statistics.median(by_tokens[n])) for n in sorted(by_tokens)]


@dataclass(frozen=True)
class AllReduceModel:
    """All-reduce seconds as a function of message bytes, from measured medians.

    Monotone (isotonic) fit of the measurements, linear interpolation between measured sizes (they are
    dense: ~1000 sizes), the smallest size's time below the range (a latency floor) and a straight line
    beyond it (slope of the upper half: bandwidth-bound). Zero bytes cost nothing.
    """

    sizes: tuple[float, ...] = ()
    seconds: tuple[float, ...] = ()
    tail_slope: float = 0.0  # seconds per byte beyond the last measured size

    def __call__(self, num_bytes: float) -> float:
        if num_bytes <= 0 or not self.sizes:
            return 0.0
        sizes, seconds = self.sizes, self.seconds
        if num_bytes <= sizes[0]:
            return seconds[0]
        if num_bytes >= sizes[-1]:
            return seconds[-1] + self.tail_slope * (num_bytes - sizes[-1])
        i = bisect.bisect_left(sizes, num_bytes)
        lo, hi = sizes[i - 1], sizes[i]
        return seconds[i - 1] + (seconds[i] - seconds[i - 1]) * (num_bytes - lo) / (hi - lo)


def read_all_reduce(
    data_dir: str | Path | None,
    gpu: str,
    tp: int,
    topology: Literal["dgx", "pairwise_nvlink"] = "dgx",
) -> Callable[[float], float]:
    """Measured all-reduce time (seconds) for `tp` workers on one node, as a function of bytes. TP 1: 0.

    Rows with num_workers == tp, preferring devices_per_node == tp (all workers in one node, as TP runs);
    where a size has several rows, the median of their medians.
    """
    if tp <= 1:
        return AllReduceModel()
    path = _data_dir(data_dir) / "profiling" / "network" / f"{_vidur_gpu_name(gpu)}_{topology}" / "all_reduce.csv"
    col = "time_stats.all_reduce.median"
    rows = _read_csv(path, [col, "num_workers", "size", "devices_per_node"])
    matching = [r for r in rows if int(r["num_workers"]) == tp]
    if not matching:
        available = sorted({int(r["num_workers"]) for r in rows})
        raise ValueError(f"{path}: no rows for TP {tp}; worker counts measured: {available}")
    one_node = [r for r in matching if int(r["devices_per_node"]) == tp]
    if not one_node:  # only multi-node measurements: take the most devices per node there are
        most = max(int(r["devices_per_node"]) for r in matching)
        one_node = [r for r in matching if int(r["devices_per_node"]) == most]
    by_size: dict[float, list[float]] = {}
    for r in one_node:
        by_size.setdefault(float(r["size"]), []).append(float(r[col]) / 1e3)
    sizes = sorted(by_size)
    fitted = isotonic([statistics.median(by_size[s]) for s in sizes], [len(by_size[s]) for s in sizes])
    mid = min(bisect.bisect_left(sizes, sizes[-1] / 2), len(sizes) - 2)
    slope = max(0.0, (fitted[-1] - fitted[mid]) / (sizes[-1] - sizes[mid])) if len(sizes) > 1 else 0.0
    return AllReduceModel(tuple(sizes), tuple(fitted), slope)


# --- the device profile ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeviceProfile:
    """Everything the simulator needs to time one node: the planner's latency model and the "truth".

    latency_model: what the runtime's planner predicts with. iteration_s(): the simulated true duration, the
    same model plus a decode length-mixing penalty the planner does not know about.
    mixing_penalty: a decode batch mixing short and long contexts runs attention slower than a homogeneous
    one (the L4 paper measures 1.1-2.1×); extra decode attention time = base × mixing_penalty × (1 − mean/max).
    0.5 is an assumption; 0 makes the latency model exact.
    """

    gpu: GPUSpec
    host: HostSpec
    shape: ModelShape
    tp: int
    latency_model: LatencyModel
    remote: RemoteCPUNodes | None = None
    mixing_penalty: float = 0.5
    # Cached per-unit rates (derived in __post_init__; not constructor arguments).
    _decode_s_per_load: float = field(init=False, repr=False, compare=False, default=0.0)

    def __post_init__(self) -> None:
        if self.tp < 1:
            raise ValueError(f"tp must be >= 1, got {self.tp}")
        object.__setattr__(self, "_decode_s_per_load", self.latency_model.attention.per_decode_load)

    # -- the GPU iteration -----------------------------------------------------------------------------------
    def iteration_s(
        self, dense_rows: float, prefill_load: float, decode_contexts: Sequence[int], logit_rows: float
    ) -> float:
        """Simulated true duration of one iteration. decode_contexts: context lengths of the decodes whose
        attention runs on the GPU (LS decodes; BE decode attention runs on the host)."""
        decode_load = sum(decode_contexts)  # C-level passes, no allocation
        seconds = self.latency_model.predict_parts(dense_rows, prefill_load, decode_load, logit_rows)
        if self.mixing_penalty and decode_load > 0:
            longest = max(decode_contexts)
            imbalance = 1.0 - decode_load / (len(decode_contexts) * longest)  # 1 - mean/max
            seconds += self._decode_s_per_load * decode_load * self.mixing_penalty * imbalance
        return seconds

    def layer_time_s(self, iteration_s: float) -> float:
        """One layer's share of an iteration: layers run one after another and are alike, so an even split
        (a BE row merged at layer l waits about this long per layer it advances)."""
        return iteration_s / self.shape.num_layers

    # -- host (CPU) attention ----------------------------------------------------------------------------------
    def cpu_task_bytes(self, context_tokens: int) -> int:
        """KV bytes one BE row's attention reads for ONE layer: all kv heads (the host holds the full KV)."""
        return context_tokens * self.shape.kv_bytes_per_token_per_layer()

    def host_attention_bandwidth_b_s(self) -> float:
        return self.host.attention_bandwidth_b_s()

    @property
    def host_task_overhead_s(self) -> float:
        return self.host.per_task_overhead_s

    def cpu_attention_s(self, context_tokens: int) -> float:
        """One BE row, one layer, if the task had the whole host's attention bandwidth (the simulator shares
        the bandwidth between concurrent tasks itself, using cpu_task_bytes and the bandwidth)."""
        return self.host.per_task_overhead_s + self.cpu_task_bytes(context_tokens) / self.host_attention_bandwidth_b_s()

    def be_qkv_bytes_per_layer(self) -> int:
        """q, k and v of one BE row for one layer (device -> host), all heads."""
        return (self.shape.num_heads + 2 * self.shape.num_kv_heads) * self.shape.head_dim * self.shape.dtype_bytes

    def be_attention_out_bytes_per_layer(self) -> int:
        """The attention output of one BE row for one layer (host -> device), all heads."""
        return self.shape.num_heads * self.shape.head_dim * self.shape.dtype_bytes

    # -- transfers ---------------------------------------------------------------------------------------------
    def pcie_s(self, num_bytes: float) -> float:
        """Host<->device transfer of `num_bytes` over the whole TP group: each GPU moves its heads' share
        (1/tp) over its own PCIe link, in parallel; plus one transfer's fixed latency."""
        if num_bytes <= 0 or math.isinf(self.gpu.pcie_gb_s):
            return 0.0
        return self.gpu.pcie_latency_s + num_bytes / (self.tp * self.gpu.pcie_gb_s * GB)

    def remote_bandwidth_b_s(self) -> float:
        """KV bytes per second all remote CPU nodes' attention reads together (0 without remote nodes)."""
        if self.remote is None:
            return 0.0
        r = self.remote
        return r.count * r.dram_bandwidth_gb_s_per_node * GB * self.host.cpu_attention_efficiency

    def network_s(self, num_bytes: float) -> float:
        """One message of `num_bytes` to or from one remote node: its link's latency and bandwidth."""
        if self.remote is None:
            raise ValueError("this profile has no remote CPU nodes")
        return self.remote.node().network_s(num_bytes)

    # -- capacities --------------------------------------------------------------------------------------------
    def gpu_kv_capacity_tokens(self, memory_utilization: float = 0.9) -> int:
        """Tokens of KV that fit in the TP group's device memory after the weights (summed over the shards)."""
        free = self.tp * self.gpu.hbm_gib * GIB * memory_utilization - self.shape.weight_bytes()
        return max(0, int(free // self.shape.kv_bytes_per_token()))

    def host_kv_capacity_tokens(self, include_remote: bool = True) -> int:
        """Tokens of BE KV in host DRAM (plus remote nodes' DRAM unless `include_remote` is False: where the
        planner places KV on the nodes as a tier of its own), 80% of it (the rest: OS, runtime, buffers)."""
        dram = self.host.dram_gib
        if self.remote is not None and include_remote:
            dram += self.remote.count * self.remote.dram_gib_per_node
        return int(dram * GIB * KV_SHARE_OF_DRAM // self.shape.kv_bytes_per_token())


# --- building profiles -----------------------------------------------------------------------------------------
DECODE_KERNEL_LAUNCH_S = 5e-6  # attention kernel launch per layer (an assumption)
LOGITS_FLOPS_EFFICIENCY = 0.6  # share of peak the lm_head GEMM reaches (an assumption)


def default_overhead_s(tp: int) -> float:
    """Per-iteration fixed cost (scheduling, input preparation, launches), an assumption: 1.5 ms at TP 1,
    plus 0.2 ms per doubling of TP (more processes to drive and synchronise)."""
    return 1.5e-3 + 0.2e-3 * math.log2(max(1, tp))


def analytic_attention(gpu: GPUSpec, shape: ModelShape, tp: int) -> LinearAttentionModel:
    """GPU attention of all layers, linear in the load. NOT measured (the Vidur copy has no attention
    timings): modelled from the datasheet with the GPU's stated efficiencies.

    - decode: each (query, key) pair reads one token's K and V in every layer, the TP shard's heads only:
      per_decode_load = kv_bytes_per_token / tp / (HBM bandwidth × decode efficiency).
    - prefill: per (query, key) pair and layer, QK^T and PV cost 2 multiply-adds = 4 FLOPs per head dim
      per head: 4 × num_heads × head_dim × num_layers / tp FLOPs at peak × prefill efficiency.
    - intercept: a kernel launch per layer.
    """
    decode = shape.kv_bytes_per_token() / tp / (gpu.hbm_bandwidth_b_s() * gpu.decode_attention_bandwidth_efficiency)
    flops = 4 * shape.num_heads * shape.head_dim * shape.num_layers / tp
    prefill = flops / (gpu.peak_flops() * gpu.prefill_attention_flops_efficiency)
    return LinearAttentionModel(DECODE_KERNEL_LAUNCH_S * shape.num_layers, prefill, decode)


def _logit_rows() -> list[int]:
    # 1..4096 in powers of two and the midpoints between them (1, 2, 3, 4, 6, 8, 12, ...).
    rows = {1}
    p = 1
    while p < 4096:
        rows.update((p * 2, p + p // 2))
        p *= 2
    return sorted(r for r in rows if r >= 1)


def analytic_logits(gpu: GPUSpec, shape: ModelShape, tp: int) -> StaircaseModel:
    """lm_head for `rows` rows: the larger of reading its weight shard and its FLOPs (a roofline)."""
    weight_s = shape.hidden_size * shape.vocab_size * shape.dtype_bytes / tp / gpu.hbm_bandwidth_b_s()
    per_row_s = 2 * shape.hidden_size * shape.vocab_size / tp / (gpu.peak_flops() * LOGITS_FLOPS_EFFICIENCY)
    return StaircaseModel.fit([(r, max(weight_s, r * per_row_s)) for r in _logit_rows()], reduce="median")


def build_gpu_profile(
    gpu: str,
    model: str,
    tp: int = 1,
    host: HostSpec | None = None,
    remote: RemoteCPUNodes | None = None,
    data_dir: str | Path | None = None,
    topology: Literal["dgx", "pairwise_nvlink"] = "dgx",
    overhead_s: float | None = None,
    mixing_penalty: float = 0.5,
    vidur_model: str | None = None,
) -> DeviceProfile:
    """A GPU node's profile: the planner's LatencyModel from measured Dense + all-reduce timings and
    analytic attention / lm_head. overhead_s None: default_overhead_s(tp). host None: the GPU's DGX host.
    model (and vidur_model): a preset, a folder with config.json or a Vidur model name (resolve_vidur_model).

    f_D(rows) = num_layers × (Dense per layer at this TP + 2 all-reduces of rows × hidden × 2 bytes),
    fitted as a monotone staircase at the measured sizes (1..4096 tokens; it extrapolates beyond).
    """
    spec = resolve_gpu(gpu)
    shape = resolve_vidur_model(model, spec.name, data_dir, vidur_model)
    if tp < 1:
        raise ValueError(f"tp must be >= 1, got {tp}")
    dense_per_layer = read_dense_profile(data_dir, spec.name, shape, tp)
    all_reduce = read_all_reduce(data_dir, spec.name, tp, topology)
    message = tp_allreduce_message_bytes(shape.hidden_size, 2)  # bytes per token of one all-reduce (bf16)
    samples = [(n, shape.num_layers * (s + TP_ALLREDUCES_PER_LAYER * all_reduce(n * message)))
               for n, s in dense_per_layer]  # fmt: skip
    latency_model = LatencyModel(
        dense=StaircaseModel.fit(samples, reduce="median"),
        attention=analytic_attention(spec, shape, tp),
        logits=analytic_logits(spec, shape, tp),
        overhead_s=default_overhead_s(tp) if overhead_s is None else overhead_s,
        dense_samples=tuple((float(n), s) for n, s in samples),
    )
    return DeviceProfile(
        gpu=spec,
        host=host if host is not None else HOSTS[DEFAULT_HOST_FOR_GPU[spec.name]],
        shape=shape,
        tp=tp,
        latency_model=latency_model,
        remote=remote,
        mixing_penalty=mixing_penalty,
    )


def load_runtime_profile(
    path: str | Path,
    shape: ModelShape,
    host: HostSpec,
    device_memory_gib: float | None = None,
    remote: RemoteCPUNodes | None = None,
) -> DeviceProfile:
    """A profile measured on this machine by `piggyback profile` (JSON {"key": ..., "model": ...}).

    The measured latency model IS the truth (mixing_penalty 0). The accelerator is the host's CPU, so there
    is no PCIe (pcie_s is 0). device_memory_gib: memory for weights + device KV; None: half of host DRAM
    (an assumption: the "device" shares DRAM with the host's BE KV).
    """
    path = Path(path)
    try:
        key, model = LatencyModel.load(path)
    except OSError as e:
        raise ValueError(f"{path}: cannot read the profile: {e}") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON: {e}") from e
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise ValueError(f"{path}: not a `piggyback profile` file ({{'key', 'model'}} JSON): {e!r}") from e
    memory = host.dram_gib / 2 if device_memory_gib is None else device_memory_gib
    bandwidth = host.sockets * host.dram_bandwidth_gb_s_per_socket
    gpu = GPUSpec(
        name=key.device_name,
        hbm_gib=memory,
        hbm_bandwidth_gb_s=bandwidth,
        peak_dense_tflops=0.0,  # unknown and unused: the latency model is measured, not derived
        pcie_gb_s=math.inf,
        pcie_latency_s=0.0,
    )
    return DeviceProfile(gpu=gpu, host=host, shape=shape, tp=1, latency_model=model, remote=remote, mixing_penalty=0.0)


def with_mixing_penalty(profile: DeviceProfile, mixing_penalty: float) -> DeviceProfile:
    """A copy with another mixing penalty (e.g. 0: the planner's model is exact)."""
    return replace(profile, mixing_penalty=mixing_penalty)
