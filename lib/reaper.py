"""The reaper: requeue or fail stalled tasks, fail the never-started, cancel their calls, redispatch the forgotten.

Then it sweeps files: uploads never completed, what ended tasks left behind, and deleted accounts' folders.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter

from lib import catalog, db
from lib.config import get_settings

log = logging.getLogger("spool.reaper")
CANCELS_AT_ONCE = 20
CANCEL_BUDGET_S = 30.0  # a pass stopping many calls while Modal is slow still gets to its respawns


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
    # First, before any respawn or file removal: the calls of attempts given up on stop holding their GPUs.
    await _stop_calls([row for row in rows if row["call_id"]])
    try:
        if abandoned := await get_asset_service().sweep_expired_uploads():
            counts["abandoned_uploads"] = abandoned
    except Exception:
        log.exception("reaper: sweeping abandoned uploads failed; the next pass tries again")
    # In Modal's queue (no GPU free) or Modal out of reach: they keep their call.
    waiting = await _live_calls([str(row["task_id"]) for row in rows if row["action"] == "redispatch"])
    counts.update(waiting.values())
    counts["redispatch"] -= len(waiting)
    if counts["redispatch"] <= 0:
        del counts["redispatch"]
    for row in rows:
        task_id = str(row["task_id"])
        if task_id in waiting:
            continue
        try:
            if row["action"] in ("requeued", "redispatch"):
                await get_task_service().dispatch(task_id=task_id, model_key=row["model_key"])
            elif row["action"] in ("failed", "expired"):  # its lost attempts may have left partial uploads
                await get_task_service().discard_orphaned_outputs(task_id=task_id)
        except Exception:  # one task's trouble must not leave the rest of the pass undone
            log.exception("reaper: %s of task %s failed; the next pass tries again", row["action"], task_id)
    try:
        if leftovers := await get_task_service().sweep_task_leftovers(after_seconds=leftover_grace_seconds()):
            counts["task_leftover_files"] = leftovers
    except Exception:
        log.exception("reaper: sweeping ended tasks' leftover files failed; the next pass tries again")
    try:  # last, under a time budget: a large deleted account must not hold up the tasks above
        if departed := await get_asset_service().sweep_departed_users():
            counts["departed_users_files"] = departed
    except Exception:
        log.exception("reaper: removing deleted accounts' files failed; the next pass tries again")
    if counts:
        log.info("reaper: %s", dict(counts))
    return dict(counts)


def leftover_grace_seconds() -> int:
    """任务结束多久之后，它的任何尝试都不可能还在上传（最长的任务连同传输余量；Modal 的函数超时也就到此）"""
    longest = max(spec.timeout_s for spec in catalog.CATALOG.values())
    return longest + catalog.IO_ALLOWANCE_S + 2 * catalog.MINUTES


async def _stop_calls(rows: list[dict]) -> None:
    """终止本轮放弃的任务的调用（停滞的尝试、排队超时的任务），否则容器占着 GPU 直到函数超时；失败只记日志"""
    from lib.dispatch import get_dispatcher

    if not rows:
        return
    dispatcher = get_dispatcher()
    limit = asyncio.Semaphore(CANCELS_AT_ONCE)

    async def stop(row: dict) -> None:
        async with limit:
            try:
                await dispatcher.cancel(task_id=str(row["task_id"]), call_id=row["call_id"])
            except Exception as exc:  # the call runs on until Modal's timeout, unable to write to the task
                log.warning("reaper: could not cancel call %s of task %s: %s", row["call_id"], row["task_id"], exc)

    try:
        async with asyncio.timeout(CANCEL_BUDGET_S):
            await asyncio.gather(*(stop(row) for row in rows))
    except TimeoutError:
        log.warning(
            "reaper: canceling %d call(s) took over %g s; those not canceled yet run on", len(rows), CANCEL_BUDGET_S
        )


async def _live_calls(task_ids: list[str]) -> dict[str, str]:
    """排队已久的任务中不该重新 spawn 的及原因（调用仍在排队或运行 / 问不到 Modal）；已结束的调用被忘掉"""
    from lib.dispatch import get_dispatcher

    if not task_ids:
        return {}
    rows = await db.fetch_all(
        "select id, call_id from public.tasks where id = any(%s::uuid[]) and status = 'queued' and call_id is not null",
        (task_ids,),
    )
    live = {}
    for row in rows:
        task_id, call_id = str(row["id"]), row["call_id"]
        try:
            pending = await get_dispatcher().call_pending(call_id=call_id)
        except Exception as exc:  # nothing known of the call: kept (not a second call), asked again next pass
            log.warning("reaper: could not ask Modal about call %s of task %s: %s", call_id, task_id, exc)
            live[task_id] = "modal_unreachable"
            continue
        if pending:  # noted as waiting: asked about again in 20 minutes, and its owner sees why it waits
            live[task_id] = "waiting_for_gpu"
            await db.execute("select public.note_task_waiting(%s, %s)", (task_id, call_id))
        else:  # it ended without taking the task: forgotten, so a failed respawn is retried within a minute
            await db.execute("select public.forget_task_call(%s, %s)", (task_id, call_id))
    return live
