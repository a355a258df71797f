"""Attention Piggybacking: BE decode attention on host CPUs, BE rows merged into the Dense batch by layer."""
