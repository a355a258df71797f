"""Names shared by the runtime's internal endpoints (server/internal.py) and the pool router (router/app.py).

A low module of its own, torch- and server-free, so that the router, the operator and the runtime can all
import it without importing one another.
"""

from __future__ import annotations

# The environment variable holding the pool's internal token: the runtimes' /internal/ endpoints require it
# as `Authorization: Bearer`, the router sends it.
INTERNAL_TOKEN_ENV = "PIGGYBACK_INTERNAL_TOKEN"
# The header carrying the client's own Authorization from the router to a runtime (service API keys).
CLIENT_AUTHORIZATION_HEADER = "x-client-authorization"
