"""The response envelopes and the one place that turns errors into them."""

from __future__ import annotations

import logging
import time
import uuid
from contextvars import ContextVar
from typing import Any, Generic, Literal, TypeVar
from uuid import UUID

import psycopg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from psycopg_pool import PoolTimeout
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match

from lib.errors import SpoolError

log = logging.getLogger("spool.api")
access_log = logging.getLogger("spool.access")
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
# Nginx's status for a request its client abandoned: the access log tells it from a server error.
CLIENT_GONE = 499


T = TypeVar("T")

# An answer always carries its fields, those with a default too: the OpenAPI schema marks them required, so a
# generated client gets neither `success?` nor an optional `next_cursor`.
ANSWER = ConfigDict(json_schema_serialization_defaults_required=True)


class Envelope(BaseModel, Generic[T]):
    """成功响应信封（OpenAPI 里每个路由的 data 都有类型）"""

    model_config = ANSWER

    success: Literal[True] = True
    data: T


class Deleted(BaseModel):
    id: UUID
    deleted: bool


class ErrorDetail(BaseModel):
    field: str
    message: str


class ErrorBody(BaseModel):
    code: str
    message: str
    details: list[ErrorDetail] | list[dict[str, Any]] | None = None  # fields of a 422; what a 409 is about


class ErrorEnvelope(BaseModel):
    model_config = ANSWER

    success: Literal[False] = False
    error: ErrorBody
    request_id: str


# Every route's errors in the OpenAPI schema: the envelope (a "4XX" entry also keeps FastAPI from documenting its
# own validation body, which this API never sends).
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    "4XX": {"model": ErrorEnvelope, "description": "The error envelope; `error.code` names the problem."},
    "5XX": {"model": ErrorEnvelope, "description": "The error envelope; `request_id` finds it in the logs."},
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
    """为每个请求分配 request id、写入响应头、记一行访问日志（纯 ASGI；最外层，CORS 拒绝的预检也在内）"""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        incoming = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        rid = (
            incoming if 0 < len(incoming) <= 64 and incoming.isascii() and incoming.isprintable() else uuid.uuid4().hex
        )
        token = request_id_var.set(rid)

        status, began = 500, time.perf_counter()

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            # One line per request, so any answer (a 404, a 409, a 503) is found by the request_id its body names.
            took = (time.perf_counter() - began) * 1000
            access_log.info("%s %s %d %.0f ms request %s", scope["method"], scope["path"], status, took, rid)
            request_id_var.reset(token)


class UnhandledErrorMiddleware:
    """把未处理的异常变成通用 500（纯 ASGI；在 CORS 之内，浏览器读得到它）"""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def send_watched(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_watched)
        except ClientDisconnect:
            # A closed tab or a dropped upload: nobody to answer and nothing wrong here (no 500, no traceback).
            log.info(
                "client disconnected during %s %s (request %s)", scope["method"], scope["path"], request_id_var.get()
            )
            if not started:
                await _client_gone()(scope, receive, send_watched)
        except Exception:
            # Logged with the traceback; the client sees a generic message only.
            rid = request_id_var.get()
            log.exception("unhandled error on %s %s (request %s)", scope["method"], scope["path"], rid)
            if not started:
                response = error_response(500, "internal_error", "Something went wrong on our side. Please try again.")
                await response(scope, receive, send_watched)


def _client_gone() -> JSONResponse:
    """客户端在请求读完前断开时的应答（没人收，只为访问日志记下 499）"""
    return error_response(CLIENT_GONE, "client_closed_request", "The client closed the connection mid-request.")


def _validation_details(exc: RequestValidationError) -> list[dict]:
    details = []
    for err in exc.errors():
        if err.get("type") == "json_invalid":  # its loc is ("body", character position): not a field
            reason = (err.get("ctx") or {}).get("error") or "not valid JSON"
            details.append({"field": "body", "message": f"{reason} (at character {err['loc'][-1]})"})
            continue
        field = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        details.append({"field": field, "message": err.get("msg")})
    return details


_UNPARSABLE = {UnicodeDecodeError: "not valid UTF-8", RecursionError: "nested too deeply"}


def _not_json(request: Request, exc: RequestValidationError) -> bool:
    """请求体不是 JSON（例如 fetch 对字符串默认的 text/plain）"""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body_refused = any(tuple(err.get("loc", ())) == ("body",) for err in exc.errors())
    # The types FastAPI parses as JSON: a text/json body reaches validation as bytes.
    maintype, _, subtype = content_type.partition("/")
    return body_refused and not (maintype == "application" and (subtype == "json" or subtype.endswith("+json")))


def _allowed_methods(request: Request) -> str:
    """这个路径上所有路由接受的方法（Starlette 只报告第一个匹配路径的路由）"""
    routes = request.app.router.routes
    methods = {
        method
        for method in ("DELETE", "GET", "PATCH", "POST", "PUT")
        if any(route.matches({**request.scope, "method": method})[0] == Match.FULL for route in routes)
    }
    if "GET" in methods:
        methods.add("HEAD")  # HeadAsGet answers it
    return ", ".join(sorted(methods))


def install_error_handlers(app: FastAPI) -> None:
    """注册统一的错误处理器"""

    @app.exception_handler(SpoolError)
    async def _domain(request: Request, exc: SpoolError):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else None
        if getattr(exc, "retry_after", None):
            headers = {"Retry-After": str(exc.retry_after)}
        return error_response(exc.status_code, exc.code, exc.message, exc.details, headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        code = HTTP_CODES.get(exc.status_code, "error")
        message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
        if isinstance(exc.__cause__, ClientDisconnect):  # FastAPI reads a JSON body's disconnect as a parse error
            return _client_gone()
        if exc.status_code == 400 and exc.__cause__ is not None:  # FastAPI's parser gave up on a JSON body
            reason = _UNPARSABLE.get(type(exc.__cause__), "not valid JSON")
            return error_response(
                422, "validation_error", "The request is not valid.", [{"field": "body", "message": reason}]
            )
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            headers["Allow"] = _allowed_methods(request)
        return error_response(exc.status_code, code, message, headers=headers or None)

    @app.exception_handler(psycopg.OperationalError)
    @app.exception_handler(PoolTimeout)
    async def _database(request: Request, exc: Exception):
        # Down, restarting, out of connections or too slow: temporary, so no traceback, and the client may retry.
        log.warning("database unavailable on %s %s: %s", request.method, request.url.path, exc)
        return error_response(
            503,
            "service_unavailable",
            "The service is briefly unavailable. Please try again in a few seconds.",
            headers={"Retry-After": "5"},
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        if _not_json(request, exc):
            return error_response(
                415, "unsupported_media_type", "Send the body as JSON, with 'Content-Type: application/json'."
            )
        return error_response(422, "validation_error", "The request is not valid.", _validation_details(exc))
