"""The reaper: requeue stalled tasks, fail and refund the worn-out and the never-started, redispatch the forgotten."""

from __future__ import annotations

import logging
from collections import Counter

from lib import db
from lib.config import get_settings

log = logging.getLogger("spool.reaper")


async def reap() -> dict[str, int]:
    """回收一轮：返回各动作的数量"""
    from lib.assets import get_asset_service
    from lib.tasks import get_task_service

    settings = get_settings()
    rows = await db.fetch_all(
        "select * from public.reap_tasks(%s, %s, %s, %s)",
        (
            settings.task_stall_seconds,
            settings.task_max_attempts,
            max(5, settings.task_stall_seconds // 2),
            settings.task_queue_timeout_seconds,
        ),
    )
    counts = Counter(row["action"] for row in rows)
    try:
        if abandoned := await get_asset_service().sweep_expired_uploads():
            counts["abandoned_uploads"] = abandoned
    except Exception:
        log.exception("reaper: sweeping abandoned uploads failed; the next pass tries again")
    try:
        if departed := await get_asset_service().sweep_departed_users():
            counts["departed_users_files"] = departed
    except Exception:
        log.exception("reaper: removing deleted accounts' files failed; the next pass tries again")
    await _withdraw_forgotten_calls([str(row["task_id"]) for row in rows if row["action"] == "redispatch"])
    for row in rows:
        task_id = str(row["task_id"])
        try:
            if row["action"] in ("requeued", "redispatch"):
                await get_task_service().dispatch(task_id=task_id, model_key=row["model_key"])
            elif row["action"] in ("failed", "expired"):  # its lost attempts may have left partial uploads
                await get_task_service().discard_orphaned_outputs(task_id=task_id)
        except Exception:  # one task's trouble must not leave the rest of the pass undone
            log.exception("reaper: %s of task %s failed; the next pass tries again", row["action"], task_id)
    if counts:
        log.info("reaper: %s", dict(counts))
    return dict(counts)


async def _withdraw_forgotten_calls(task_ids: list[str]) -> None:
    """重新派发前撤回仍在排队的旧调用：等 GPU 的任务不会每 20 分钟多一个调用（每个都要冷启动一个容器）"""
    from lib.dispatch import get_dispatcher

    if not task_ids:
        return
    rows = await db.fetch_all(
        "select id, call_id from public.tasks where id = any(%s::uuid[]) and status = 'queued' and call_id is not null",
        (task_ids,),
    )
    for row in rows:
        try:  # not started (the task is still queued): withdrawing the input stops no work
            await get_dispatcher().cancel(task_id=str(row["id"]), call_id=row["call_id"], terminate=False)
        except Exception as exc:  # the new call runs it either way; the old one exits at its claim
            log.warning("reaper: could not withdraw call %s of task %s: %s", row["call_id"], row["id"], exc)
