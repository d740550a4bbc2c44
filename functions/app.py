"""Builds the FastAPI app: routers, envelopes, request ids, CORS."""

from __future__ import annotations

import sys
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware

from functions import assets, billing, credits, health, models, projects, tasks
from functions.errors import (
    ERROR_RESPONSES,
    RequestIdMiddleware,
    UnhandledErrorMiddleware,
    error_response,
    install_error_handlers,
)
from functions.limits import BodyLimitMiddleware
from functions.query import given_once
from lib import db
from lib.config import get_settings, origin_of
from lib.logs import configure_logging

ROUTERS = (health, models, credits, billing, projects, assets, tasks)


class HeadAsGet:
    """HEAD 按 GET 处理、不发响应体（FastAPI 的路由不会自动接受 HEAD；监控常用 HEAD）"""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "HEAD":
            return await self.app(scope, receive, send)

        async def send_headers_only(message):
            if message["type"] == "http.response.body":
                if message.get("more_body"):
                    return
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, send_headers_only)


class CORS(CORSMiddleware):
    """CORS；拒绝的预检也是错误信封（说明是 CORS_ORIGINS），而不是一行纯文本"""

    def preflight_response(self, request_headers):
        response = super().preflight_response(request_headers)
        if response.status_code != 400:
            return response
        refused = response.body.decode().removeprefix("Disallowed CORS ")  # e.g. "origin" (methods, headers: any)
        message = (
            f"Disallowed CORS {refused}: a web app calls this API from an origin listed in CORS_ORIGINS"
            f" (this one: {request_headers.get('origin', '')})."
        )
        kept = {k: v for k, v in response.headers.items() if k.startswith("access-control-") or k == "vary"}
        return error_response(400, "bad_request", message, headers=kept)


@asynccontextmanager
async def lifespan(app: FastAPI):
    yield
    if "lib.storage" in sys.modules:  # only if a request used it
        await sys.modules["lib.storage"].get_storage().close()
    await db.close_pool()


def create_app() -> FastAPI:
    """创建 API 应用"""
    settings = get_settings()
    settings.require_complete()
    configure_logging(settings.log_level)
    app = FastAPI(
        title="Spool API",
        version="1.0.0",
        description="Credits, tasks and media for the Spool app.",
        lifespan=lifespan,
        redirect_slashes=False,  # "/tasks/" is a 404 in the envelope, not a bare redirect
    )
    for module in ROUTERS:
        app.include_router(module.router, responses=ERROR_RESPONSES, dependencies=[Depends(given_once)])
    install_error_handlers(app)
    # Added last is outermost: CORS wraps the rest, so a browser can read every error, the 413 and the 500 included;
    # the request id and the access log wrap CORS, so a refused preflight is logged too.
    app.add_middleware(HeadAsGet)
    app.add_middleware(BodyLimitMiddleware)
    app.add_middleware(UnhandledErrorMiddleware)
    app.add_middleware(
        CORS,
        # CORSMiddleware compares the Origin header's text exactly: "https://app.example.com/" admitted no browser.
        allow_origins=[origin_of(origin) or origin for origin in settings.cors_origins],
        allow_methods=["*"],
        allow_headers=["*"],
        expose_headers=["x-request-id", "retry-after", "www-authenticate", "allow"],  # the ones errors carry
    )
    app.add_middleware(RequestIdMiddleware)
    return app
