"""Builds the FastAPI app: routers, envelopes, request ids, CORS."""

from __future__ import annotations

import logging
import sys
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from functions import assets, billing, credits, health, models, projects, tasks
from functions.errors import RequestIdMiddleware, install_error_handlers
from functions.limits import BodyLimitMiddleware
from lib import db
from lib.config import get_settings

ROUTERS = (health, models, credits, billing, projects, assets, tasks)


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
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = FastAPI(
        title="Spool API",
        version="1.0.0",
        description="Credits, tasks and media for the Spool app.",
        lifespan=lifespan,
    )
    for module in ROUTERS:
        app.include_router(module.router)
    install_error_handlers(app)
    # Added last is outermost: CORS wraps the rest, so a browser can read every error, the 413 and the 500 included.
    app.add_middleware(BodyLimitMiddleware)
    app.add_middleware(RequestIdMiddleware)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.cors_origins,
        allow_methods=["*"],
        allow_headers=["*"],
        expose_headers=["x-request-id"],
    )
    return app
