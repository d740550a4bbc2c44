"""A cap on the request bodies routes read whole (JSON), so an oversized body is refused before it fills memory."""

from __future__ import annotations

from fastapi import HTTPException

from functions.errors import error_response

MAX_BODY_BYTES = 1024 * 1024  # a task's params, a project, a Stripe event: all far below this
# Routes that stream their bodies and enforce their own limits: the direct upload, and the local Storage stand-in.
STREAMED_ROUTES = {("POST", "/assets")}
STREAMED_PREFIXES = ("/storage/v1/",)
TOO_LARGE = f"The request body is larger than {MAX_BODY_BYTES // 1024} KiB."


class BodyLimitMiddleware:
    """请求体超过上限 → 413（纯 ASGI：先看 Content-Length，再边读边数）"""

    def __init__(self, app, max_bytes: int = MAX_BODY_BYTES):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self._streamed(scope):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await error_response(413, "payload_too_large", TOO_LARGE)(scope, receive, send)
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:  # a chunked body, or one longer than it said
                raise HTTPException(413, TOO_LARGE)  # FastAPI passes it through body parsing to the envelope
            return message

        await self.app(scope, counted, send)

    @staticmethod
    def _streamed(scope) -> bool:
        path = scope["path"]
        return (scope["method"], path.rstrip("/")) in STREAMED_ROUTES or path.startswith(STREAMED_PREFIXES)
