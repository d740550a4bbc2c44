"""Projects: create, list, read, rename, delete (the caller's own; others' → 404)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated
from uuid import UUID

from fastapi import APIRouter
from pydantic import BaseModel, StringConstraints

from functions.auth import CurrentUserId
from functions.errors import Deleted, Envelope, ok
from functions.query import page_size
from lib.fields import STORABLE, RequestBody
from lib.projects import get_project_service

router = APIRouter(prefix="/projects", tags=["Projects"])

ProjectName = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=200), STORABLE]
Description = Annotated[str, StringConstraints(max_length=5000), STORABLE]


class ProjectCreate(RequestBody):
    name: ProjectName
    description: Description | None = None


class ProjectUpdate(RequestBody):
    name: ProjectName = None  # may be left out, never null (a default is not validated)
    description: Description | None = None


class ProjectPublic(BaseModel):
    id: UUID
    name: str
    description: str | None
    created_at: datetime
    updated_at: datetime


class ProjectPage(BaseModel):
    items: list[ProjectPublic]
    next_cursor: str | None


@router.post("", status_code=201, response_model=Envelope[ProjectPublic])
async def create_project(body: ProjectCreate, user_id: CurrentUserId):
    """创建项目"""
    project = await get_project_service().create_project(user_id=user_id, name=body.name, description=body.description)
    return ok(ProjectPublic.model_validate(project))


@router.get("", response_model=Envelope[ProjectPage])
async def list_projects(user_id: CurrentUserId, limit: page_size(100) = 20, cursor: str | None = None):
    """项目列表（最新在前，游标分页）"""
    return ok(
        ProjectPage.model_validate(
            await get_project_service().list_projects(user_id=user_id, limit=limit, cursor=cursor)
        )
    )


@router.get("/{project_id}", response_model=Envelope[ProjectPublic])
async def get_project(project_id: UUID, user_id: CurrentUserId):
    """查询项目"""
    return ok(
        ProjectPublic.model_validate(
            await get_project_service().get_project(user_id=user_id, project_id=str(project_id))
        )
    )


@router.patch("/{project_id}", response_model=Envelope[ProjectPublic])
async def update_project(project_id: UUID, body: ProjectUpdate, user_id: CurrentUserId):
    """修改项目"""
    project = await get_project_service().update_project(
        user_id=user_id, project_id=str(project_id), changes=body.model_dump(exclude_unset=True)
    )
    return ok(ProjectPublic.model_validate(project))


@router.delete("/{project_id}", response_model=Envelope[Deleted])
async def delete_project(project_id: UUID, user_id: CurrentUserId):
    """删除项目（资源与任务保留）"""
    await get_project_service().delete_project(user_id=user_id, project_id=str(project_id))
    return ok({"id": str(project_id), "deleted": True})
