"""Length-aware routing across a pool's replicas: stage planning, routing policies, the live router.

The names the router and the runtimes' internal endpoints (migration.py) share live here, so that the router
process imports neither torch nor the engine.
"""

# The environment variable holding the pool's internal token: the runtimes' /internal/ endpoints require it
# as `Authorization: Bearer`, the router sends it.
INTERNAL_TOKEN_ENV = "PIGGYBACK_INTERNAL_TOKEN"
# The header carrying the client's own Authorization from the router to a runtime (service API keys).
CLIENT_AUTHORIZATION_HEADER = "x-client-authorization"
