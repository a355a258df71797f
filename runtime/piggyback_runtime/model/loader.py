"""Load a model by URI: file:///path or pvc://CLAIM/PATH (a Hugging Face folder) or synthetic://PRESET."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import safe_open

from piggyback_runtime.config import DEFAULT_PVC_MOUNT_ROOT, PVC_MOUNT_ROOT_ENV, ModelConfig
from piggyback_runtime.model.arch import ModelArch, ModelLoadError, synthetic_arch
from piggyback_runtime.model.llama import LlamaForCausalLM, rope_inv_freq
from piggyback_runtime.model.parallel import TensorParallelGroup, shard_spec, take_shard
from piggyback_runtime.model.tokenizer import Tokenizer, builtin_tokenizer, load_hf_tokenizer

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# Under tensor parallelism a synthetic model up to this size is initialised whole and sliced, so every tp
# gives the weights of tp 1 (same tokens); a larger one is initialised per rank from seed + rank.
SYNTHETIC_SLICE_MAX_PARAMETERS = 200_000_000


@dataclass
class LoadedModel:
    model: LlamaForCausalLM  # under tensor parallelism: this rank's shard (`model.arch` is the shard's)
    arch: ModelArch  # the whole model's
    tokenizer: Tokenizer
    max_model_len: int
    dtype: torch.dtype
    device: torch.device
    eos_token_ids: tuple[int, ...]
    uri: str
    tp: TensorParallelGroup | None = None

    @property
    def shard_arch(self) -> ModelArch:
        """This rank's heads, KV heads and MLP width (the whole model's without tensor parallelism)."""
        return self.model.arch

    @property
    def tensor_parallel_size(self) -> int:
        return self.tp.world_size if self.tp is not None else 1


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} was asked for but no CUDA device is available; use 'cpu' or 'auto'")
    return dev


def resolve_dtype(name: str, device: torch.device, checkpoint_dtype: str | None) -> torch.dtype:
    if name == "auto":
        if device.type == "cpu":
            dtype = torch.float32  # CPU matmuls are fastest and exact in fp32
        else:
            dtype = DTYPES.get(checkpoint_dtype or "", torch.bfloat16)
            if dtype == torch.float32:
                dtype = torch.bfloat16
    else:
        dtype = DTYPES[name]
    if device.type == "cpu" and dtype == torch.float16:
        raise ModelLoadError("dtype float16 is not supported on the CPU device; use bfloat16 or float32")
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ModelLoadError(f"dtype bfloat16 is not supported on {torch.cuda.get_device_name(device)}; use float16")
    return dtype


def model_folder(uri: str) -> Path:
    if uri.startswith("file://"):
        path = Path(uri.removeprefix("file://"))
    elif uri.startswith("pvc://"):
        rest = uri.removeprefix("pvc://").strip("/")
        if not rest:
            raise ModelLoadError(f"{uri}: a pvc:// URI needs a claim name: pvc://CLAIM/PATH")
        path = Path(os.environ.get(PVC_MOUNT_ROOT_ENV, DEFAULT_PVC_MOUNT_ROOT)) / rest
    else:
        raise ModelLoadError(f"{uri}: not a folder URI (file:// or pvc://)")
    if not path.is_dir():
        raise ModelLoadError(f"{uri}: model folder {path} does not exist or is not a folder")
    return path


def safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelLoadError(f"{index}: has no 'weight_map'")
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (folder / s).exists()]
        if missing:
            raise ModelLoadError(f"{folder}: shards listed in {index.name} are missing: {', '.join(missing)}")
        return [folder / s for s in shards]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{folder}: no *.safetensors weights found (pytorch .bin checkpoints are not supported)")
    return files


def iter_safetensors(files: list[Path], device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    for file in files:
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                yield name, f.get_tensor(name)


def iter_safetensors_shard(
    files: list[Path], device: torch.device, rank: int, world_size: int
) -> Iterator[tuple[str, torch.Tensor]]:
    """A tensor-parallel rank's slices of every tensor: `get_slice` reads only the rows or columns it holds."""
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                part = f.get_slice(name)
                shape = tuple(part.get_shape())
                yield name, take_shard(part, shape, shard_spec(name), rank, world_size).to(device)


def shard_state(
    tensors: Iterator[tuple[str, torch.Tensor]], rank: int, world_size: int
) -> Iterator[tuple[str, torch.Tensor]]:
    """A rank's slices of whole tensors (a synthetic model initialised whole)."""
    for name, tensor in tensors:
        yield name, take_shard(tensor, tuple(tensor.shape), shard_spec(name), rank, world_size)


def _check_max_len(arch: ModelArch, requested: int | None, source: str) -> int:
    if requested is None:
        return arch.max_position_embeddings
    if requested > arch.max_position_embeddings:
        raise ModelLoadError(
            f"{source}: max_model_len {requested} is longer than the model allows "
            f"(max_position_embeddings={arch.max_position_embeddings})"
        )
    return requested


def _empty_model(
    arch: ModelArch, device: torch.device, dtype: torch.dtype, tp: TensorParallelGroup | None = None
) -> LlamaForCausalLM:
    # Build on the meta device and materialise once: no wasted random init of billions of parameters.
    with torch.device("meta"):
        model = LlamaForCausalLM(arch, tp)
    model = model.to_empty(device=device).to(dtype)
    model.tie_weights()
    model.inv_freq = rope_inv_freq(arch).to(device)  # to_empty leaves buffers uninitialised; keep it fp32
    return model.eval()


def load_model(cfg: ModelConfig, device: str = "auto", tp: TensorParallelGroup | None = None) -> LoadedModel:
    """The model, or under tensor parallelism (`tp`, this process's rank) this rank's shard of it."""
    dev = resolve_device(device)
    tp = tp if tp is not None and tp.world_size > 1 else None
    world, rank = (tp.world_size, tp.rank) if tp is not None else (1, 0)
    if cfg.uri.startswith("synthetic://"):
        name = cfg.uri.removeprefix("synthetic://")
        arch = synthetic_arch(name)
        arch.check_tensor_parallel(world)
        dtype = resolve_dtype(cfg.dtype, dev, None)
        model = _empty_model(arch, dev, dtype, tp)
        if tp is None:
            model.init_synthetic(cfg.seed)
        elif arch.num_parameters() <= SYNTHETIC_SLICE_MAX_PARAMETERS:
            whole = _empty_model(arch, dev, dtype)
            whole.init_synthetic(cfg.seed)
            model.load_weights(shard_state(iter(whole.state_dict().items()), rank, world), source=cfg.uri)
            del whole
        else:
            model.init_synthetic(cfg.seed + rank)
        tokenizer = builtin_tokenizer(arch.vocab_size)
        log.info("synthetic model %s: %.1fM parameters, %s on %s", name, arch.num_parameters() / 1e6, dtype, dev)
    else:
        folder = model_folder(cfg.uri)
        config_file = folder / "config.json"
        if not config_file.exists():
            raise ModelLoadError(f"{cfg.uri}: no config.json in {folder}")
        hf_config = json.loads(config_file.read_text())
        arch = ModelArch.from_hf_config(hf_config, source=str(config_file))
        arch.check_tensor_parallel(world)
        dtype = resolve_dtype(cfg.dtype, dev, hf_config.get("torch_dtype") or hf_config.get("dtype"))
        files = safetensors_files(folder)
        model = _empty_model(arch, dev, dtype, tp)
        weights = iter_safetensors(files, dev) if tp is None else iter_safetensors_shard(files, dev, rank, world)
        model.load_weights(weights, source=cfg.uri)
        tokenizer = load_hf_tokenizer(folder)
        generation = folder / "generation_config.json"
        if generation.exists():
            eos = json.loads(generation.read_text()).get("eos_token_id")
            if eos is not None:
                arch = _with_eos(arch, eos)
    eos_ids = set(arch.eos_token_ids)
    if tokenizer.eos_token_id is not None:
        eos_ids.add(tokenizer.eos_token_id)
    return LoadedModel(
        model=model,
        arch=arch,
        tokenizer=tokenizer,
        max_model_len=_check_max_len(arch, cfg.max_model_len, cfg.uri),
        dtype=dtype,
        device=dev,
        eos_token_ids=tuple(sorted(eos_ids)),
        uri=cfg.uri,
        tp=tp,
    )


def _with_eos(arch: ModelArch, eos: int | list[int]) -> ModelArch:
    ids = tuple(eos) if isinstance(eos, list) else (eos,)
    return replace(arch, eos_token_ids=tuple(sorted(set(arch.eos_token_ids) | set(ids))))
