"""Models: the catalog and price quotes."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from fastapi import APIRouter
from pydantic import BaseModel, Field

from functions.auth import CurrentUserId
from functions.errors import ANSWER, Envelope, ok
from lib.catalog import CATALOG, list_models
from lib.errors import NotFound
from lib.fields import RequestBody
from lib.tasks import get_task_service

router = APIRouter(prefix="/models", tags=["Models"])


class ModelInfo(BaseModel):
    key: str
    kind: str
    title: str
    params_schema: dict[str, Any] = Field(description="JSON schema of the params POST /tasks takes.")
    price_rule: str
    gpu: str | None
    available: bool


class ModelList(BaseModel):
    model_config = ANSWER

    items: list[ModelInfo]
    next_cursor: None = None


class Quote(BaseModel):
    model_key: str
    credits: int
    balance: int
    affordable: bool


class QuoteRequest(RequestBody):
    params: dict[str, Any] = Field(default_factory=dict)
    input_asset_ids: list[UUID] | None = Field(
        None, max_length=10, description="Optional: the input assets, which must match the asset ids in params."
    )


@router.get("", response_model=Envelope[ModelList])
async def get_models():
    """模型目录（与其他列表同形：items + next_cursor，目录只有一页）"""
    return ok({"items": list_models(), "next_cursor": None})


@router.post("/{key}/quote", response_model=Envelope[Quote])
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
