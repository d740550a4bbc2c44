"""The original platform's task utilities: status and progress writes, input downloads, output uploads, asset rows."""

from __future__ import annotations

import asyncio
import json
import logging
import mimetypes
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from lib import db
from lib.errors import InvalidInput, NotFound, OutputTooLarge, PayloadTooLarge, TaskCanceled, TransientError

log = logging.getLogger("spool.jobs")
T = TypeVar("T")

RETRY_DELAYS = (0.5, 2.0, 5.0)


class ClaimLost(Exception):
    """本次尝试已不再有效（任务被回收器重新排队，由其他 worker 接手）"""


async def with_retries(what: str, step: Callable[[], Awaitable[T]]) -> T:
    """对临时错误（网络、存储）按退避重试，仍失败则抛 TransientError"""
    for attempt, delay in enumerate((*RETRY_DELAYS, None), start=1):
        try:
            return await step()
        except (TaskCanceled, ClaimLost):
            raise
        except Exception as exc:
            if delay is None or not is_transient(exc):
                if is_transient(exc):
                    raise TransientError(f"{what} failed after {attempt} tries: {exc}") from exc
                raise
            log.warning("%s failed (try %d): %s; retrying in %.1fs", what, attempt, exc, delay)
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")


def is_transient(exc: BaseException) -> bool:
    """网络、存储与数据库连接的临时错误可重试；4xx 等永久错误不重试"""
    import httpx
    import psycopg

    # OperationalError / InterfaceError: the connection dropped, a failover, a restart; not a bad query.
    transient = (TransientError, httpx.TransportError, ConnectionError, TimeoutError)
    if isinstance(exc, (*transient, psycopg.OperationalError, psycopg.InterfaceError)):
        return True
    status = getattr(exc, "status", None) or getattr(getattr(exc, "response", None), "status_code", None)
    try:
        return int(status) >= 500 or int(status) == 429
    except (TypeError, ValueError):
        return False


async def update_task_status(
    task_id: str, attempt: int, *, progress: float | None = None, message: str | None = None
) -> str:
    """写进度并刷新心跳；任务已取消 → TaskCanceled，尝试已失效 → ClaimLost"""
    row = await db.fetch_one(
        "select * from public.report_task_progress(%s, %s, %s::real, %s)", (task_id, attempt, progress, message)
    )
    if row is None:
        raise ClaimLost(f"task {task_id} no longer exists")
    if not row["current"]:
        if row["status"] == "canceled":
            raise TaskCanceled(task_id)
        raise ClaimLost(f"task {task_id} is {row['status']} (attempt {attempt} no longer current)")
    return row["status"]


async def load_task_state(task_id: str) -> dict:
    """读取任务的持久状态（之前的尝试保存的）"""
    row = await db.fetch_one("select state from public.task_job_states where task_id = %s", (task_id,))
    return dict(row["state"]) if row else {}


async def save_task_state(task_id: str, attempt: int, state: dict) -> None:
    """持久化任务状态（例如外部提供方的任务 id），重试后可恢复"""
    row = await db.fetch_one(
        "select public.save_task_state(%s, %s, %s::jsonb) as ok", (task_id, attempt, json.dumps(state))
    )
    if not row["ok"]:
        await update_task_status(task_id, attempt)  # raises TaskCanceled or ClaimLost
        raise ClaimLost(f"task {task_id}: state not saved")


async def download_file_to_temp(asset: dict, workdir: Path) -> Path:
    """把输入资源下载到临时目录"""
    from lib.storage import get_storage

    suffix = Path(asset["path"]).suffix or mimetypes.guess_extension(asset.get("mime") or "") or ""
    dest = workdir / f"input-{asset['id']}{suffix}"
    try:
        await with_retries(
            f"download of asset {asset['id']}", lambda: get_storage().download_to(path=asset["path"], dest=dest)
        )
    except NotFound:
        raise InvalidInput("An input file of this task is missing from storage.") from None
    return dest


async def upload_to_supabase(local_file: Path, storage_path: str, content_type: str) -> None:
    """把输出文件上传到存储"""
    from lib.storage import get_storage

    try:
        await with_retries(
            f"upload of {storage_path}",
            lambda: get_storage().upload_file(path=storage_path, local_file=local_file, content_type=content_type),
        )
    except PayloadTooLarge:  # over the bucket's (or the project's) file size limit: no retry can store it
        size_mb = await asyncio.to_thread(os.path.getsize, local_file) / 1e6
        raise OutputTooLarge(
            f"The result is {size_mb:,.0f} MB, more than storage accepts. Try a shorter clip or a smaller scale."
            " Your credits were refunded."
        ) from None


async def create_asset_record(conn, *, task: dict, output, path: str) -> dict:
    """在给定事务中插入任务产出的资源行（ready，带 source_task_id）"""
    from lib.assets import get_asset_service

    return await get_asset_service().create_asset_record(
        user_id=task["user_id"],
        project_id=task.get("project_id"),
        kind=output.kind,
        path=path,
        mime=output.mime,
        size=output.path.stat().st_size,
        width=output.width,
        height=output.height,
        duration_s=output.duration_s,
        fps=output.fps,
        source_task_id=task["id"],
        metadata={"role": output.role, **output.metadata},
        conn=conn,
    )
