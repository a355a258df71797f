"""Llama-family model: architecture (`arch`), per-layer split decoder (`llama`), loaders (`loader`), tokenizer,
tensor-parallel sharding (`parallel`).

Nothing is imported here: `model.arch` (the architectures and the synthetic presets) is pure Python, and the
operator reads the presets from it without torch, which the other modules need.
"""
