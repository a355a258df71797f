"""Discrete-event simulator: the runtime's scheduler in simulated time, with workloads and latency models."""
