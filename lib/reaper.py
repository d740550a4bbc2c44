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
        if abandoned := await get_asset_service().discard_abandoned_uploads():
            counts["abandoned_uploads"] = abandoned
    except Exception:
        log.exception("reaper: sweeping abandoned uploads failed; the next pass tries again")
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
