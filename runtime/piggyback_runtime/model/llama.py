"""Llama-family decoder in plain torch, split per layer so rows can enter and leave the Dense batch anywhere.

Layer l of a token is three steps:
    q, k, v = layer.pre_attention(hidden, cos, sin)      # Dense: RMSNorm, QKV projection, RoPE
    attn    = <attention>(q, k, v)                       # against this row's KV cache, wherever it lives
    hidden  = layer.post_attention(attn, hidden)         # Dense: o_proj, residual, RMSNorm, SwiGLU MLP, residual
The hidden state going into `pre_attention` is the residual that `post_attention` needs: a row whose
attention runs elsewhere (the CPU, for BE) keeps it until its attention output comes back.

Parameter names are Hugging Face's, so a checkpoint's state dict loads without renaming.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from piggyback_runtime.model.arch import ModelArch, ModelLoadError
from piggyback_runtime.model.parallel import TensorParallelGroup, padded_vocab

AttentionFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 like the reference implementation; bf16 squares lose too much.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_inv_freq(arch: ModelArch) -> torch.Tensor:
    d = arch.head_dim
    inv_freq = 1.0 / (arch.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    scaling = arch.rope_scaling
    if scaling.rope_type == "linear":
        inv_freq = inv_freq / scaling.factor
    elif scaling.rope_type == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, interpolate smoothly between.
        old_len = scaling.original_max_position_embeddings
        low_wavelen = old_len / scaling.low_freq_factor
        high_wavelen = old_len / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
        smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
        smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(is_medium, smoothed, scaled)
    return inv_freq.float()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class DecoderLayer(nn.Module):
    def __init__(self, arch: ModelArch, tp: TensorParallelGroup | None = None) -> None:
        """`arch`: this rank's shard under tensor parallelism (model/parallel.py), whose o_proj and down_proj
        outputs are partial sums that `tp` all-reduces."""
        super().__init__()
        h = arch.hidden_size
        self.arch = arch
        self.tp = tp
        self.input_layernorm = RMSNorm(h, arch.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(h, arch.rms_norm_eps)
        self.self_attn = nn.Module()
        self.self_attn.q_proj = nn.Linear(h, arch.q_size, bias=arch.attention_bias)
        self.self_attn.k_proj = nn.Linear(h, arch.kv_size, bias=arch.attention_bias)
        self.self_attn.v_proj = nn.Linear(h, arch.kv_size, bias=arch.attention_bias)
        self.self_attn.o_proj = nn.Linear(arch.q_size, h, bias=False)
        self.mlp = nn.Module()
        self.mlp.gate_proj = nn.Linear(h, arch.intermediate_size, bias=False)
        self.mlp.up_proj = nn.Linear(h, arch.intermediate_size, bias=False)
        self.mlp.down_proj = nn.Linear(arch.intermediate_size, h, bias=False)

    def pre_attention(
        self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """hidden [T, H] -> q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D], RoPE applied to q and k."""
        a = self.arch
        x = self.input_layernorm(hidden)
        n = x.shape[0]
        q = self.self_attn.q_proj(x).view(n, a.num_attention_heads, a.head_dim)
        k = self.self_attn.k_proj(x).view(n, a.num_key_value_heads, a.head_dim)
        v = self.self_attn.v_proj(x).view(n, a.num_key_value_heads, a.head_dim)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        return q, k, v

    def post_attention(self, attn: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """attn [T, Hq, D] (or [T, Hq*D]) + the layer's input hidden [T, H] -> the layer's output hidden."""
        attn_out = self.self_attn.o_proj(attn.reshape(attn.shape[0], -1))
        if self.tp is not None:
            attn_out = self.tp.all_reduce(attn_out)
        h = residual + attn_out
        x = self.post_attention_layernorm(h)
        mlp_out = self.mlp.down_proj(F.silu(self.mlp.gate_proj(x)) * self.mlp.up_proj(x))
        if self.tp is not None:
            mlp_out = self.tp.all_reduce(mlp_out)
        return h + mlp_out


class LlamaForCausalLM(nn.Module):
    def __init__(self, arch: ModelArch, tp: TensorParallelGroup | None = None) -> None:
        """`arch`: the whole model's; under tensor parallelism (`tp`) this rank builds its shard of it."""
        super().__init__()
        self.full_arch = arch
        self.tp = tp if tp is not None and tp.world_size > 1 else None
        world, rank = (self.tp.world_size, self.tp.rank) if self.tp is not None else (1, 0)
        arch = arch.shard(world)
        self.arch = arch
        # Vocabulary-parallel: this rank's rows of the embedding and the lm_head (vocabulary padded to tp).
        vocab_rows = padded_vocab(arch.vocab_size, world) // world
        self.vocab_start = rank * vocab_rows
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(vocab_rows, arch.hidden_size)
        self.model.layers = nn.ModuleList(DecoderLayer(arch, self.tp) for _ in range(arch.num_hidden_layers))
        self.model.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.lm_head = nn.Linear(arch.hidden_size, vocab_rows, bias=False)
        self.tie_weights()
        self.register_buffer("inv_freq", rope_inv_freq(arch), persistent=False)

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.layers

    def tie_weights(self) -> None:
        if self.arch.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        if self.tp is None:
            return self.model.embed_tokens(token_ids)
        # Each rank looks up the ids in its vocabulary rows (zeros elsewhere); the sum over ranks is the lookup.
        local = token_ids - self.vocab_start
        outside = (local < 0) | (local >= self.model.embed_tokens.num_embeddings)
        hidden = self.model.embed_tokens(local.masked_fill(outside, 0))
        return self.tp.all_reduce(hidden.masked_fill(outside.unsqueeze(-1), 0.0))

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, D] for these positions, computed in fp32 and shared by every layer."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(self.model.norm(hidden)).float()
        if self.tp is None:
            return logits
        # Every rank computes its vocabulary slice; the gathered rows past the real vocabulary are padding.
        return self.tp.all_gather_last_dim(logits)[:, : self.full_arch.vocab_size]

    def forward_layers(self, token_ids: torch.Tensor, positions: torch.Tensor, attention: AttentionFn) -> torch.Tensor:
        """Run every layer for a flat batch of tokens; `attention(layer, q, k, v)` owns the KV cache."""
        hidden = self.embed(token_ids)
        cos, sin = self.rope(positions, hidden.dtype)
        for index, layer in enumerate(self.model.layers):
            q, k, v = layer.pre_attention(hidden, cos, sin)
            hidden = layer.post_attention(attention(index, q, k, v), hidden)
        return hidden

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], source: str) -> None:
        """Copy named tensors into the parameters; every parameter must be covered exactly once."""
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded: set[str] = set()
        for name, tensor in weights:
            if name.endswith("rotary_emb.inv_freq"):
                continue  # a buffer older checkpoints saved; we compute it from the config
            if name not in params:
                raise ModelLoadError(f"{source}: unexpected tensor {name!r} (is this a Llama-family checkpoint?)")
            param = params[name]
            if tuple(param.shape) != tuple(tensor.shape):
                raise ModelLoadError(
                    f"{source}: tensor {name!r} has shape {tuple(tensor.shape)}, config.json implies "
                    f"{tuple(param.shape)}"
                )
            param.copy_(tensor.to(param.dtype))
            loaded.add(name)
        if self.arch.tie_word_embeddings:
            loaded.add("lm_head.weight")
        missing = sorted(set(params) - loaded)
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise ModelLoadError(f"{source}: checkpoint is missing {len(missing)} tensors: {shown}")

    @torch.no_grad()
    def init_synthetic(self, seed: int) -> None:
        """Deterministic random weights (same seed and device type → same weights).

        Variance-preserving scales keep activations O(1) through any depth, so greedy decoding of random
        weights has clear winners (few near-ties) and costs exactly what real weights cost.
        """
        device = next(self.parameters()).device
        gen = torch.Generator(device=device).manual_seed(seed)
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.normal_(0.0, 0.1, generator=gen)
            elif name == "model.embed_tokens.weight":
                param.normal_(0.0, 1.0, generator=gen)
            else:
                param.normal_(0.0, 1.0 / math.sqrt(param.shape[1]), generator=gen)
        if not self.arch.tie_word_embeddings:
            # Sharper output distribution than the variance-preserving scale would give.
            self.lm_head.weight.mul_(4.0)
