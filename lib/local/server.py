"""The local server: the product's app with the local stand-ins (JWKS, Storage, Realtime, dev users) beside it."""

from __future__ import annotations

from fastapi import FastAPI

from functions.app import create_app
from lib.local import dev_auth, realtime, storage

LOCAL_ROUTERS = [dev_auth.router, storage.router, realtime.router]


def create_local_app() -> FastAPI:
    """产品 API 加上本地替身服务"""
    app = create_app()
    for router in LOCAL_ROUTERS:
        app.include_router(router)
    return app
