"""Architecture of a Llama-family decoder, parsed from a Hugging Face config.json or a synthetic preset."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


# Tensor parallelism (model/parallel.py): what crosses the GPUs' link. The simulator's TP model (sim/devices.py)
# reads the same figures. Per layer, two all-reduces (after o_proj and after down_proj) of one hidden vector per
# token each; per iteration, one all-reduce of the embeddings (same size) and one all-gather of the fp32 logits of
# the sampled rows (vocabulary/tp per rank).
TP_ALLREDUCES_PER_LAYER = 2


def tp_allreduce_message_bytes(hidden_size: int, element_bytes: int) -> int:
    """Bytes per token of one tensor-parallel all-reduce (each rank's partial hidden vector)."""
    return hidden_size * element_bytes


class ModelLoadError(ValueError):
    """The model cannot be loaded as asked; the message says what is missing or unsupported and what to do."""


@dataclass(frozen=True)
class RopeScaling:
    rope_type: str = "default"
    factor: float = 1.0
    # llama3 only
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelArch:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def kv_bytes_per_token(self, element_bytes: int) -> int:
        return 2 * self.num_hidden_layers * self.kv_size * element_bytes

    def num_parameters(self) -> int:
        h, i, n = self.hidden_size, self.intermediate_size, self.num_hidden_layers
        per_layer = h * (self.q_size + 2 * self.kv_size) + self.q_size * h + 3 * h * i + 2 * h
        embeddings = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return n * per_layer + embeddings + h

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], source: str = "config.json") -> ModelArch:
        def need(key: str) -> Any:
            if key not in cfg:
                raise ModelLoadError(f"{source}: required field {key!r} is missing")
            return cfg[key]

        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelLoadError(
                f"{source}: model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if cfg.get("hidden_act", "silu") != "silu":
            raise ModelLoadError(f"{source}: hidden_act {cfg['hidden_act']!r} is not supported (only 'silu')")
        if cfg.get("mlp_bias"):
            raise ModelLoadError(f"{source}: mlp_bias=true is not supported")
        if cfg.get("sliding_window") and cfg.get("use_sliding_window", model_type == "mistral"):
            raise ModelLoadError(f"{source}: sliding-window attention is not supported")
        heads = int(need("num_attention_heads"))
        hidden = int(need("hidden_size"))
        head_dim = cfg.get("head_dim") or hidden // heads
        # transformers >= 5 writes `rope_parameters` (with rope_theta inside); older files `rope_scaling`.
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        rope_theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        return cls(
            model_type=model_type,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_hidden_layers=int(need("num_hidden_layers")),
            num_attention_heads=heads,
            num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            max_position_embeddings=int(need("max_position_embeddings")),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6 if model_type == "qwen2" else 1e-5)),
            rope_theta=float(rope_theta),
            rope_scaling=_parse_rope_scaling(rope, source),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            # Qwen2 always has a bias on q/k/v; Llama has one only when attention_bias is set.
            attention_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
        ).validated(source)

    def validated(self, source: str) -> ModelArch:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelLoadError(
                f"{source}: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ModelLoadError(f"{source}: head_dim ({self.head_dim}) must be even for RoPE")
        return self

    def check_tensor_parallel(self, world_size: int, field_name: str = "engine.tensor_parallel_size") -> None:
        """Raise ModelLoadError (naming `field_name`) unless this model splits into `world_size` equal shards:
        attention heads, KV heads (each rank holds whole KV heads) and the MLP width divisible by it."""
        if world_size < 1:
            raise ModelLoadError(f"{field_name} must be at least 1, got {world_size}")
        for name, value in (("num_attention_heads", self.num_attention_heads),
                            ("num_key_value_heads", self.num_key_value_heads),
                            ("intermediate_size", self.intermediate_size)):  # fmt: skip
            if value % world_size:
                raise ModelLoadError(
                    f"{field_name}={world_size} does not divide the model's {name} ({value}); use a divisor of "
                    f"{math.gcd(self.num_attention_heads, self.num_key_value_heads, self.intermediate_size)}"
                )

    def shard(self, world_size: int) -> ModelArch:
        """One tensor-parallel rank's part: its attention heads, KV heads and MLP width (model/parallel.py)."""
        if world_size == 1:
            return self
        self.check_tensor_parallel(world_size)
        return replace(self, num_attention_heads=self.num_attention_heads // world_size,
                       num_key_value_heads=self.num_key_value_heads // world_size,
                       intermediate_size=self.intermediate_size // world_size)  # fmt: skip

    def to_hf_config(self) -> dict[str, Any]:
        """The config.json a Hugging Face model of this architecture would have (for synthetic models)."""
        rope: dict[str, Any] | None = None
        if self.rope_scaling.rope_type != "default":
            rope = {"rope_type": self.rope_scaling.rope_type, "factor": self.rope_scaling.factor}
            if self.rope_scaling.rope_type == "llama3":
                rope |= {
                    "low_freq_factor": self.rope_scaling.low_freq_factor,
                    "high_freq_factor": self.rope_scaling.high_freq_factor,
                    "original_max_position_embeddings": self.rope_scaling.original_max_position_embeddings,
                }
        cfg: dict[str, Any] = {
            "architectures": ["Qwen2ForCausalLM" if self.model_type == "qwen2" else "LlamaForCausalLM"],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids)
            if len(self.eos_token_ids) > 1
            else (self.eos_token_ids[0] if self.eos_token_ids else None),
        }
        if self.model_type == "llama":
            cfg["attention_bias"] = self.attention_bias
            cfg["mlp_bias"] = False
        return cfg


def _parse_rope_scaling(raw: dict[str, Any] | None, source: str) -> RopeScaling:
    if not raw:
        return RopeScaling()
    rope_type = raw.get("rope_type") or raw.get("type") or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelLoadError(
            f"{source}: rope_scaling type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if rope_type == "default":
        return RopeScaling()
    if "factor" not in raw:
        raise ModelLoadError(f"{source}: rope_scaling of type {rope_type!r} needs a 'factor'")
    if rope_type == "linear":
        return RopeScaling(rope_type="linear", factor=float(raw["factor"]))
    missing = [k for k in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings") if k not in raw]
    if missing:
        raise ModelLoadError(f"{source}: rope_scaling of type 'llama3' is missing {', '.join(missing)}")
    return RopeScaling(
        rope_type="llama3",
        factor=float(raw["factor"]),
        low_freq_factor=float(raw["low_freq_factor"]),
        high_freq_factor=float(raw["high_freq_factor"]),
        original_max_position_embeddings=int(raw["original_max_position_embeddings"]),
    )


_LLAMA3_ROPE = RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)

# Synthetic presets: the shapes of real architectures, with deterministic random weights. Token ids 1 and 2
# are the built-in tokenizer's BOS and EOS (tokenizer.py), whatever the real model used.
SYNTHETIC_PRESETS: dict[str, ModelArch] = {
    # For tests: a few layers, GQA, llama3 rope scaling, untied embeddings.
    # head_dim 32: the smallest the native CPU attention kernel takes, so tests exercise it.
    "tiny-llama": ModelArch("llama", 512, 128, 256, 2, 4, 2, 32, 2048, rope_theta=500000.0,
                            rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 256),
                            bos_token_id=1, eos_token_ids=(2,)),
    # The demo's and CPU benchmarks' model: big enough that compute dominates Python overhead on 2 cores.
    "small-llama": ModelArch("llama", 2048, 512, 1408, 4, 8, 2, 64, 4096, rope_theta=500000.0,
                             bos_token_id=1, eos_token_ids=(2,)),
    # For tensor-parallel tests: 4 KV heads (tiny-llama's 2 split over at most 2 ranks).
    "tiny-llama-mha": ModelArch("llama", 512, 128, 256, 2, 4, 4, 32, 2048, rope_theta=10000.0,
                                bos_token_id=1, eos_token_ids=(2,)),
    "tiny-qwen2": ModelArch("qwen2", 512, 128, 256, 2, 4, 2, 32, 2048, rms_norm_eps=1e-6,
                            rope_theta=1000000.0, tie_word_embeddings=True, attention_bias=True,
                            bos_token_id=None, eos_token_ids=(2,)),
    "llama-3-8b": ModelArch("llama", 128256, 4096, 14336, 32, 32, 8, 128, 131072, rope_theta=500000.0,
                            rope_scaling=_LLAMA3_ROPE, bos_token_id=1, eos_token_ids=(2,)),
    "llama-2-7b": ModelArch("llama", 32000, 4096, 11008, 32, 32, 32, 128, 4096,
                            bos_token_id=1, eos_token_ids=(2,)),
    "llama-2-70b": ModelArch("llama", 32000, 8192, 28672, 80, 64, 8, 128, 4096,
                             bos_token_id=1, eos_token_ids=(2,)),
    # CodeLlama-34B: the 34B shape whose GPU timings are measured (../shared/data/vidur), the simulator's Yi-34B.
    "codellama-34b": ModelArch("llama", 32000, 8192, 22016, 48, 64, 8, 128, 16384, rope_theta=1000000.0,
                               bos_token_id=1, eos_token_ids=(2,)),
    "yi-34b": ModelArch("llama", 64000, 7168, 20480, 60, 56, 8, 128, 4096, rope_theta=5000000.0,
                        bos_token_id=1, eos_token_ids=(2,)),
}  # fmt: skip


def synthetic_arch(name: str) -> ModelArch:
    if name not in SYNTHETIC_PRESETS:
        raise ModelLoadError(f"synthetic://{name} is not a known preset; known: {', '.join(sorted(SYNTHETIC_PRESETS))}")
    return SYNTHETIC_PRESETS[name]
