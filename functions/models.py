"""Models: the catalog and price quotes."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from fastapi import APIRouter
from pydantic import Field

from functions.auth import CurrentUserId
from functions.errors import ok
from lib.catalog import CATALOG, list_models
from lib.errors import NotFound
from lib.fields import RequestBody
from lib.tasks import get_task_service

router = APIRouter(prefix="/models", tags=["Models"])


class QuoteRequest(RequestBody):
    params: dict[str, Any] = Field(default_factory=dict)
    input_asset_ids: list[UUID] | None = Field(
        None, max_length=10, description="Optional: the input assets, which must match the asset ids in params."
    )


@router.get("")
async def get_models():
    """模型目录（与其他列表同形：items + next_cursor，目录只有一页）"""
    return ok({"items": list_models(), "next_cursor": None})


@router.post("/{key}/quote")
async def quote(key: str, body: QuoteRequest, user_id: CurrentUserId):
    """按参数报价（不扣费）；路径里的模型不在目录中 → 404"""
    spec = CATALOG.get(key)
    if spec is None or not spec.public:
        raise NotFound(f"There is no model '{key}'; GET /models lists them.")
    return ok(
        await get_task_service().quote(
            user_id=user_id, model_key=key, params=body.params, input_asset_ids=body.input_asset_ids
        )
    )
