"""Projects: a user's folders of work. Every read and write runs as the user, so RLS guards it."""

from __future__ import annotations

from functools import cache

import psycopg
from psycopg import sql

from lib import db
from lib.errors import Conflict, NotFound
from lib.paging import page_after, page_of

PROJECT_COLUMNS = "id, name, description, created_at, updated_at"
UPDATABLE = ("name", "description")


class ProjectService:
    """项目服务"""

    async def create_project(self, *, user_id: str, name: str, description: str | None = None) -> dict:
        """创建项目"""
        try:
            with db.user_must_exist():
                return await db.fetch_one_as(
                    user_id,
                    f"insert into public.projects (user_id, name, description) values (%s, %s, %s)"
                    f" returning {PROJECT_COLUMNS}",
                    (user_id, name, description),
                )
        except psycopg.Error as exc:
            if exc.sqlstate == "SPP09":  # the per-account limit (limit_projects_per_account)
                raise Conflict(exc.diag.message_primary) from None
            raise

    async def list_projects(self, *, user_id: str, limit: int = 20, cursor: str | None = None) -> dict:
        """项目列表（最新在前，游标分页）"""
        after = page_after(cursor)
        rows = await db.fetch_all_as(
            user_id,
            f"select {PROJECT_COLUMNS} from public.projects"
            " where (%(at)s::timestamptz is null or (created_at, id) < (%(at)s, %(id)s::uuid))"
            " order by created_at desc, id desc limit %(limit)s",
            {**after, "limit": limit + 1},
        )
        return page_of(rows, limit)

    async def get_project(self, *, user_id: str, project_id: str) -> dict:
        """查询自己的一个项目（他人的 → 404）"""
        row = await db.fetch_one_as(
            user_id, f"select {PROJECT_COLUMNS} from public.projects where id = %s", (project_id,)
        )
        if row is None:
            raise NotFound("Project not found.")
        return row

    async def require_owned(self, *, user_id: str, project_id: str) -> None:
        """确认项目属于该用户，否则 404"""
        await self.get_project(user_id=user_id, project_id=project_id)

    async def update_project(self, *, user_id: str, project_id: str, changes: dict) -> dict:
        """修改项目（只改给出的字段）"""
        changes = {k: v for k, v in changes.items() if k in UPDATABLE}
        if not changes:
            return await self.get_project(user_id=user_id, project_id=project_id)
        assignments = sql.SQL(", ").join(
            sql.SQL("{} = {}").format(sql.Identifier(k), sql.Placeholder(k)) for k in changes
        )
        query = sql.SQL(
            "update public.projects set {}, updated_at = now() where id = %(id)s returning " + PROJECT_COLUMNS
        ).format(assignments)
        row = await db.fetch_one_as(user_id, query, {**changes, "id": project_id})
        if row is None:
            raise NotFound("Project not found.")
        return row

    async def delete_project(self, *, user_id: str, project_id: str) -> None:
        """删除项目（其资源与任务保留，project_id 置空）"""
        row = await db.fetch_one_as(user_id, "delete from public.projects where id = %s returning id", (project_id,))
        if row is None:
            raise NotFound("Project not found.")


@cache
def get_project_service() -> ProjectService:
    """获取项目服务单例"""
    return ProjectService()
