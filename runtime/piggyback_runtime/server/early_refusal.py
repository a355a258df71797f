"""A pure ASGI layer in front of the FastAPI app that answers an overloaded LS service's refusals itself.

Under overload most LS requests are refused (429), and FastAPI's stack (middleware, routing, dependency
solving, the exception handlers) cost most of the CPU each refusal took on the HTTP thread, which shares the
process and the GIL with the engine thread. For the generate routes this layer reads the body once and asks
`refuse(scope, body)`, which answers the refusal the handler would have answered (server/app.py,
`refuse_before_routing`), or None: the request then goes on untouched, its body replayed message for message,
later messages (a disconnect) read from the client as before.

Not Starlette's BaseHTTPMiddleware: it buffers streamed responses and hides client disconnects.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

Refuse = Callable[[Scope, bytes], Response | None]


class EarlyRefusal:
    """POSTs to `paths`: `refuse(scope, body)`'s response when it gives one, else the wrapped app."""

    def __init__(self, app: ASGIApp, paths: Collection[str], refuse: Refuse) -> None:
        self.app = app
        self.paths = frozenset(paths)
        self.refuse = refuse

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        read: list[Message] = []
        chunks: list[bytes] = []
        while True:
            message = await receive()
            read.append(message)
            if message["type"] != "http.request":  # the client left before sending it all: the app sees that
                break
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                response = self.refuse(scope, b"".join(chunks))
                if response is not None:
                    await response(scope, receive, send)
                    return
                break
        await self.app(scope, _replay(read, receive), send)


def _replay(read: list[Message], receive: Receive) -> Receive:
    """`receive` that first gives back the messages already read, then the client's own."""
    pending = list(read)

    async def replayed() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replayed
