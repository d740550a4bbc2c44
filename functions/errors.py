"""The response envelopes and the one place that turns errors into them."""

from __future__ import annotations

import logging
import uuid
from contextvars import ContextVar
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lib.errors import SpoolError

log = logging.getLogger("spool.api")
request_id_var: ContextVar[str] = ContextVar("request_id", default="-")

HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    402: "insufficient_credits",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "too_many_requests",
    503: "service_unavailable",
}


def ok(data: Any) -> dict:
    """成功响应信封"""
    return {"success": True, "data": data}


def error_response(status: int, code: str, message: str, details: Any = None, headers=None) -> JSONResponse:
    """错误响应信封"""
    error = {"code": code, "message": message}
    if details is not None:
        error["details"] = details
    body = {"success": False, "error": error, "request_id": request_id_var.get()}
    return JSONResponse(body, status_code=status, headers=headers)


class RequestIdMiddleware:
    """为每个请求分配 request id、写入响应头，并把未处理的异常变成通用 500（纯 ASGI）"""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        incoming = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        rid = incoming if 0 < len(incoming) <= 64 and incoming.isprintable() else uuid.uuid4().hex
        token = request_id_var.set(rid)

        started = False

        async def send_with_id(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            # Logged with the traceback; the client sees a generic message only.
            log.exception("unhandled error on %s %s (request %s)", scope["method"], scope["path"], rid)
            if not started:
                response = error_response(500, "internal_error", "Something went wrong on our side. Please try again.")
                await response(scope, receive, send_with_id)
        finally:
            request_id_var.reset(token)


def _validation_details(exc: RequestValidationError) -> list[dict]:
    return [
        {"field": ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body", "message": err.get("msg")}
        for err in exc.errors()
    ]


def install_error_handlers(app: FastAPI) -> None:
    """注册统一的错误处理器"""

    @app.exception_handler(SpoolError)
    async def _domain(request: Request, exc: SpoolError):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else None
        return error_response(exc.status_code, exc.code, exc.message, exc.details, headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        code = HTTP_CODES.get(exc.status_code, "error")
        message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
        return error_response(exc.status_code, code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return error_response(422, "validation_error", "The request is not valid.", _validation_details(exc))
