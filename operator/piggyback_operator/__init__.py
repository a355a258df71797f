"""Piggyback Kubernetes operator for LLMService resources."""
