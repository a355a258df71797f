"""Length-aware routing across a pool's replicas: stage planning, routing policies, the live router.

The names the router and the runtimes' internal endpoints share are defined in config.py (the bottom layer) and
re-exported here, so that the router process imports neither torch nor the engine.
"""

from piggyback_runtime.config import CLIENT_AUTHORIZATION_HEADER, INTERNAL_TOKEN_ENV

__all__ = ["CLIENT_AUTHORIZATION_HEADER", "INTERNAL_TOKEN_ENV"]
