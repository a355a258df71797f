"""Piggyback node-local runtime: LS and BE LLM services of one model on one accelerator."""
