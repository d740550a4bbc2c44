"""The local server: the product's app with the local stand-ins (JWKS, Storage, Realtime, dev users) beside it."""

from __future__ import annotations

from fastapi import FastAPI

from functions.app import create_app
from functions.errors import ERROR_RESPONSES
from lib.config import get_settings
from lib.local import dev_auth, realtime, storage


def create_local_app() -> FastAPI:
    """产品 API 加上本地替身服务（仅本地模式：开发用户接口不能出现在云端）"""
    if not get_settings().is_local:
        raise RuntimeError("the local server runs only with SPOOL_MODE=local; deploy functions.app:create_app")
    app = create_app()
    app.include_router(dev_auth.router, responses=ERROR_RESPONSES)
    # Supabase's own shapes, not this API's: not in its schema
    for router in (storage.router, storage.resumable_router, realtime.router):
        app.include_router(router, include_in_schema=False)
    app.add_middleware(storage.ExposeTusHeaders)  # outside CORS, which sets its own list of exposed headers
    return app
