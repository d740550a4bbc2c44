"""Tasks: create (charged once, idempotent), list, read, cancel."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal
from uuid import UUID

from fastapi import APIRouter, Response
from pydantic import BaseModel, Field

from functions.auth import CurrentUserId
from functions.errors import Envelope, ok
from functions.headers import IdempotencyKey
from functions.query import Filter, page_size
from lib.fields import RequestBody
from lib.tasks import get_task_service

router = APIRouter(prefix="/tasks", tags=["Tasks"])

TaskStatus = Literal["queued", "processing", "completed", "failed", "canceled"]


class TaskPublic(BaseModel):
    id: UUID
    project_id: UUID | None
    model_key: str
    params: dict[str, Any]
    status: TaskStatus
    progress: float
    message: str | None
    cost: int
    input_asset_ids: list[UUID]
    result: dict[str, Any] | None
    result_url: str | None = Field(description="Signed download link of the result, fresh on every read.")
    error: dict[str, Any] | None = Field(description="{code, message} of a failed or canceled task.")
    attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime


class TaskPage(BaseModel):
    items: list[TaskPublic]
    next_cursor: str | None


class TaskCreate(RequestBody):
    model_key: str = Field(min_length=1, max_length=100, examples=["image.upscale"])
    params: dict[str, Any] = Field(default_factory=dict)
    project_id: UUID | None = None


REPLAYED = {
    200: {
        "model": Envelope[TaskPublic],
        "description": "A replay (the same Idempotency-Key and request): the earlier task, nothing charged.",
    }
}


@router.post("", status_code=201, response_model=Envelope[TaskPublic], responses=REPLAYED)
async def create_task(
    body: TaskCreate,
    user_id: CurrentUserId,
    response: Response,
    idempotency_key: IdempotencyKey = None,
):
    """创建任务（扣除积分；同一 Idempotency-Key 重放返回同一任务）"""
    task, created = await get_task_service().create_task(
        user_id=user_id,
        model_key=body.model_key,
        params=body.params,
        project_id=str(body.project_id) if body.project_id else None,
        idempotency_key=idempotency_key,
    )
    if not created:
        response.status_code = 200  # a replay: same task, nothing charged
    return ok(task)


@router.get("", response_model=Envelope[TaskPage])
async def list_tasks(
    user_id: CurrentUserId,
    status: Filter[TaskStatus] = None,
    project_id: Filter[UUID] = None,
    limit: page_size(100) = 20,
    cursor: str | None = None,
):
    """任务列表"""
    return ok(
        await get_task_service().list_tasks(
            user_id=user_id,
            status=status,
            project_id=str(project_id) if project_id else None,
            limit=limit,
            cursor=cursor,
        )
    )


@router.get("/{task_id}", response_model=Envelope[TaskPublic])
async def get_task(task_id: UUID, user_id: CurrentUserId):
    """查询任务"""
    return ok(await get_task_service().get_task(user_id=user_id, task_id=str(task_id)))


@router.post("/{task_id}/cancel", response_model=Envelope[TaskPublic])
async def cancel_task(task_id: UUID, user_id: CurrentUserId):
    """取消任务并退款"""
    return ok(await get_task_service().cancel_task(user_id=user_id, task_id=str(task_id)))
