"""Llama-family model: architecture, per-layer split decoder, loaders, tokenizer."""

from piggyback_runtime.model.arch import ModelArch, ModelLoadError
from piggyback_runtime.model.llama import LlamaForCausalLM
from piggyback_runtime.model.loader import LoadedModel, load_model

__all__ = ["LlamaForCausalLM", "LoadedModel", "ModelArch", "ModelLoadError", "load_model"]
