"""GET /health."""

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from functions.errors import ok
from lib.health import check_database

router = APIRouter(tags=["Health"])


@router.get("/health")
async def health():
    """服务健康检查"""
    db_ok = await check_database()
    body = ok({"status": "ok" if db_ok else "degraded", "db": "ok" if db_ok else "unavailable"})
    return JSONResponse(body, status_code=200 if db_ok else 503)
