"""GET /health."""

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from functions.errors import Envelope, ErrorEnvelope, ok, request_id_var
from lib.health import check_database

router = APIRouter(tags=["Health"])


class Health(BaseModel):
    status: str
    db: str


class HealthDown(ErrorEnvelope):
    data: Health


DOWN = {
    503: {"model": HealthDown, "description": "The database is not reachable: the error, with `data` for monitors."}
}


@router.get("/health", response_model=Envelope[Health], responses=DOWN)
async def health():
    """服务健康检查（数据库不可达 → 503，错误信封里仍带状态）"""
    if await check_database():
        return ok({"status": "ok", "db": "ok"})
    body = {
        "success": False,
        "data": {"status": "degraded", "db": "unavailable"},
        "error": {"code": "service_unavailable", "message": "The database is not reachable."},
        "request_id": request_id_var.get(),
    }
    return JSONResponse(body, status_code=503)
