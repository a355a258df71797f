"""Length-aware routing across a pool's replicas: stage planning, routing policies, the live router."""

# Re-exported for the operator and the CLI, which import them from here; they live in internal_api.py.
from piggyback_runtime.internal_api import CLIENT_AUTHORIZATION_HEADER, INTERNAL_TOKEN_ENV

__all__ = ["CLIENT_AUTHORIZATION_HEADER", "INTERNAL_TOKEN_ENV"]
