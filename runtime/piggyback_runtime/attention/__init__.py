"""Attention kernels: accelerator attention over the paged KV cache, and CPU attention for BE decode."""
