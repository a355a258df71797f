"""Length-aware routing across a pool's replicas: stage planning, routing policies, the live router.

The names the router and the runtimes' internal endpoints (migration.py) share live here, so that the router
process imports neither torch nor the engine.
"""

from piggyback_runtime.config import INTERNAL_TOKEN_ENV

__all__ = ["CLIENT_AUTHORIZATION_HEADER", "INTERNAL_TOKEN_ENV"]

# The header carrying the client's own Authorization from the router to a runtime (service API keys).
CLIENT_AUTHORIZATION_HEADER = "x-client-authorization"
