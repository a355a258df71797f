"""Paged KV caches: the block allocator and the KV tensors (accelerator for LS, host DRAM for BE)."""
