"""run_task(task_id): claim → inputs → handler → outputs → asset rows → finish.

One entry point for Modal and the local worker.
"""

from __future__ import annotations

import asyncio
import contextvars
import importlib
import json
import logging
import mimetypes
import tempfile
import threading
import time
from pathlib import Path

import psycopg
from pydantic import ValidationError

from gpu_jobs.handlers import JobContext, OutputFile
from gpu_jobs.task_base import (
    ClaimLost,
    create_asset_record,
    download_file_to_temp,
    is_transient,
    load_task_state,
    save_task_state,
    update_task_status,
    upload_to_supabase,
)
from lib import catalog, db
from lib.config import get_settings
from lib.errors import InvalidInput, TaskCanceled

log = logging.getLogger("spool.runner")

PROGRESS_SECONDS = 0.5
PROGRESS_STEP = 0.05
REFUNDED = "Your credits were refunded."
UNEXPECTED = f"Processing failed unexpectedly. {REFUNDED}"
NO_RESULT = f"The job produced no result. {REFUNDED}"
UPLOAD_GONE = "The upload was deleted before its check finished."
COMMIT_WAIT_S = 30  # how long to wait for a commit whose answer was lost to land or roll back
TASK_GONE = "SP404"  # finish_task: no such task (its account was deleted, and the task with it)


class Superseded(Exception):
    """任务在完成前已被取消或被接手：丢弃产出"""


class UploadGone(Exception):
    """探测的上传在检查结束前被删除：海报不入库"""


class NoResult(Exception):
    """处理器正常返回，却没有 result 产出"""


class TimedOut(Exception):
    """任务超过时限（处理器的 timeout_s，或连同传输文件的总时限）"""

    def __init__(self, limit_s: float, what: str = ""):
        super().__init__(f"over its {limit_s:g} s limit{what}")
        self.limit_s = limit_s
        self.what = what


class Progress:
    """节流的进度回调（处理器线程调用）；每次写入同时刷新心跳并发现取消"""

    def __init__(self, task_id: str, attempt: int, loop: asyncio.AbstractEventLoop):
        self.task_id, self.attempt, self.loop = task_id, attempt, loop
        self.stop: BaseException | None = None
        self._last_time = 0.0
        self._last_fraction = -1.0
        self._last_message: str | None = None

    def __call__(self, fraction: float, message: str | None = None) -> None:
        if self.stop is not None:
            raise self.stop
        now = time.monotonic()
        fraction = min(max(float(fraction), 0.0), 1.0)
        # A new message is a new phase ("Saving image"): written at once, or the UI shows the old one until the next
        # write, which may be the end of the phase.
        new_message = message is not None and message != self._last_message
        if (
            now - self._last_time < PROGRESS_SECONDS
            and fraction - self._last_fraction < PROGRESS_STEP
            and not new_message
        ):
            return
        self._last_time, self._last_fraction = now, fraction
        if message is not None:
            self._last_message = message
        self.write(round(fraction * 0.95, 4), message)  # the last 5 % is the upload

    def write(self, fraction: float | None, message: str | None = None) -> None:
        future = asyncio.run_coroutine_threadsafe(self.awrite(fraction, message), self.loop)
        future.result(timeout=60)
        if self.stop is not None:
            raise self.stop

    async def awrite(self, fraction: float | None, message: str | None = None) -> None:
        try:
            await update_task_status(self.task_id, self.attempt, progress=fraction, message=message)
        except (TaskCanceled, ClaimLost) as exc:
            self.stop = exc
        except Exception as exc:  # a missed progress write must not kill the job
            log.warning("progress write for task %s failed: %s", self.task_id, exc)

    async def heartbeat(self, every: float) -> None:
        """处理器长时间没有进度时也保持心跳"""
        while self.stop is None:
            await asyncio.sleep(every)
            await self.awrite(None)


def load_handler(path: str):
    """按 "module:function" 导入处理器"""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


async def run_task_async(task_id: str, *, claimed: dict | None = None, call_id: str | None = None) -> str:
    """运行一个任务，返回其最终状态（未能认领时返回 'skipped'）；call_id：运行它的 Modal 调用"""
    # The claim records the call that made it, so that a cancel reaches it and no other call can reclaim the task.
    task = claimed or await db.fetch_one("select * from public.claim_task(%s, %s)", (task_id, call_id))
    if task is None and call_id:  # Modal runs an input again after losing its container: this call held the task
        task = await db.fetch_one(
            "select * from public.reclaim_task(%s, %s, %s)", (task_id, call_id, get_settings().task_max_attempts)
        )
    if task is None:
        log.info("task %s is not queued; nothing to do", task_id)
        return "skipped"
    task = {**task, "id": str(task["id"]), "user_id": str(task["user_id"])}
    attempt = task["attempts"]
    progress = Progress(task["id"], attempt, asyncio.get_running_loop())
    log.info("task %s (%s) started, attempt %d", task["id"], task["model_key"], attempt)
    outcome = await _outcome(task, attempt, progress)
    if attempt > 1 and outcome in ("completed", "failed"):  # an earlier attempt may have died mid-upload
        from lib.tasks import get_task_service

        await get_task_service().discard_orphaned_outputs(task_id=task["id"])
    return outcome


async def _outcome(task: dict, attempt: int, progress: Progress) -> str:
    """运行并把各种结局（含异常）归结为最终状态"""
    settings = get_settings()
    beat = asyncio.create_task(progress.heartbeat(max(1.0, settings.task_stall_seconds / 4)))
    try:
        with tempfile.TemporaryDirectory(prefix=f"spool-{task['id'][:8]}-") as tmp:
            return await _run(task, attempt, progress, Path(tmp))
    except asyncio.CancelledError:  # the worker is stopping: the handler thread stops at its next progress call
        progress.stop = progress.stop or ClaimLost(f"task {task['id']}: the worker stopped")
        raise
    except (TaskCanceled, Superseded):
        log.info("task %s was canceled or finished elsewhere; outputs discarded", task["id"])
        return "canceled"
    except ClaimLost as exc:
        log.warning("task %s: %s; stopping", task["id"], exc)
        return "lost"
    except InvalidInput as exc:
        return await _fail(task, attempt, exc.task_error_code, exc.message)
    except UploadGone:
        log.info("task %s: the upload it checked was deleted; its poster is discarded", task["id"])
        return await _fail(task, attempt, "canceled", UPLOAD_GONE, status="canceled")
    except NoResult:
        outcome = await _fail(task, attempt, "processing_error", NO_RESULT)
        if outcome == "failed":
            log.error("task %s: its handler returned no result output", task["id"])
        return outcome
    except TimedOut as exc:
        log.warning("task %s: %s", task["id"], exc)
        minutes = max(1, round(exc.limit_s / 60))
        return await _fail(
            task, attempt, "timeout", f"The job took longer than {minutes} min{exc.what} and was stopped. {REFUNDED}"
        )
    except Exception as exc:
        if is_transient(exc):  # storage, network or database trouble: another attempt may well succeed
            log.warning("task %s: %s", task["id"], exc)
            row = await db.fetch_one(
                "select public.requeue_task(%s, %s, %s, %s) as status",
                (task["id"], attempt, settings.task_max_attempts, "A temporary problem interrupted the job; retrying."),
            )
            return row["status"]
        outcome = await _fail(task, attempt, "processing_error", UNEXPECTED)
        if outcome == "failed":
            log.exception("task %s failed unexpectedly", task["id"])
        return outcome
    finally:
        beat.cancel()


async def _run(task: dict, attempt: int, progress: Progress, workdir: Path) -> str:
    spec = catalog.get_model(task["model_key"])
    # Moving inputs and outputs has its own allowance on top of the handler's limit, and Modal's timeout leaves room
    # for both: a job stuck on storage fails here with `timeout` and a refund, instead of being killed and rerun.
    try:
        async with asyncio.timeout(spec.timeout_s + catalog.IO_ALLOWANCE_S) as overall:
            return await _run_steps(task, attempt, progress, workdir, spec)
    except TimeoutError:
        if not overall.expired():
            raise
        progress.stop = TimedOut(spec.timeout_s + catalog.IO_ALLOWANCE_S, " (moving its files included)")
        raise progress.stop from None


async def _run_steps(task: dict, attempt: int, progress: Progress, workdir: Path, spec: catalog.ModelSpec) -> str:
    try:
        params = spec.params.model_validate(task["params"])
    except ValidationError:  # queued under an older version of the model
        raise InvalidInput(f"The parameters of this task no longer suit '{spec.title}'. {REFUNDED}") from None
    try:
        assets = await _input_assets(task)
        inputs = {asset_id: await download_file_to_temp(asset, workdir) for asset_id, asset in assets.items()}
    except InvalidInput:
        # Deleting an upload is how its check is stopped: one deleted before the check read it ends canceled.
        if (
            spec.key == "media.probe"
            and await db.fetch_one("select 1 from public.assets where id = %s", (str(params.asset_id),)) is None
        ):
            raise UploadGone(str(params.asset_id)) from None
        raise
    await update_task_status(task["id"], attempt, progress=0.02, message="Processing")
    loop = asyncio.get_running_loop()
    ctx = JobContext(
        task_id=task["id"],
        params=params,
        inputs=inputs,
        input_meta=assets,
        workdir=workdir,
        progress=progress,
        device=_device() if spec.gpu else "cpu",  # CPU pools' jobs never load torch (their image has none)
        state=await load_task_state(task["id"]),
        save_state=lambda state: asyncio.run_coroutine_threadsafe(
            save_task_state(task["id"], attempt, state), loop
        ).result(timeout=60),
    )
    handler = load_handler(spec.handler)
    try:
        # The heartbeat goes on while a handler hangs, so the reaper would never see it: the limit is kept here.
        async with asyncio.timeout(spec.timeout_s) as limit:
            outputs: list[OutputFile] = await _in_handler_thread(handler, ctx)
    except TimeoutError:
        if not limit.expired():  # the handler's own (a network read, a database round trip): temporary
            raise
        progress.stop = TimedOut(spec.timeout_s)  # the thread stops at its next progress
        raise progress.stop from None
    except InvalidInput as exc:
        if spec.key == "media.probe":
            await _settle_probe(task, ctx, reason=exc.message)
        raise
    await progress.awrite(0.96, "Saving the result")  # best effort: a blip here must not throw the result away
    if progress.stop is not None:
        raise progress.stop
    # A probe's result is the facts it found (its poster is extra); any other task is paid for its result file.
    if spec.key != "media.probe" and not any(output.role == "result" for output in outputs or []):
        raise NoResult(task["id"])
    return await _publish(task, attempt, spec, ctx, outputs)


async def _publish(task: dict, attempt: int, spec, ctx: JobContext, outputs: list[OutputFile]) -> str:
    """上传产出，并在一个事务里写资源行与 completed；若任务已被取消则回滚并删除上传的对象"""
    from lib.storage import get_storage

    settings = get_settings()
    storage = get_storage()
    uploaded: list[tuple[OutputFile, str]] = []
    try:
        for index, output in enumerate(outputs):
            ext = Path(output.path).suffix or mimetypes.guess_extension(output.mime) or ""
            # Each attempt writes its own objects: a superseded attempt still uploading cannot overwrite (or, as
            # it cleans up, delete) the outputs of the attempt that completed.
            path = f"{task['user_id']}/tasks/{task['id']}/{attempt}/{output.role}-{index}{ext}"
            await upload_to_supabase(output.path, path, output.mime)
            uploaded.append((output, path))
        if spec.key == "media.probe":
            await _settle_probe(task, ctx, reason=None)
        # Signed before the transaction opens: no storage call while it holds a pooled connection (and row locks).
        main_path = next((path for output, path in uploaded if output.role == "result"), None)
        result_url = (
            await storage.create_signed_url(path=main_path, expires_in=settings.signed_url_seconds)
            if main_path
            else None
        )
        async with db.transaction() as conn:
            if spec.key == "media.probe":
                await _hold_probed_upload(conn, ctx)
            records = [
                await create_asset_record(conn, task=task, output=output, path=path) for output, path in uploaded
            ]
            results = [r for r, (output, _) in zip(records, uploaded, strict=True) if output.role == "result"]
            main = results[0] if results else None
            result = {
                "asset_ids": [str(r["id"]) for r in records],
                **(
                    {
                        "asset_id": str(main["id"]),
                        "path": main["path"],
                        "kind": main["kind"],
                        "width": main["width"],
                        "height": main["height"],
                        "duration_s": main["duration_s"],
                        "fps": main["fps"],
                    }
                    if main
                    else {}
                ),
                **ctx.result,
            }
            cur = await conn.execute(
                "select public.finish_task(%s, 'completed', %s::jsonb, %s, null, %s, %s) as r",
                (task["id"], json.dumps(result, default=str), result_url, "Done", attempt),
            )
            if not (await cur.fetchone())["r"]["changed"]:
                raise Superseded(task["id"])
    except BaseException:
        if uploaded:
            done = await _completed_by(task["id"], attempt)
            if done:  # the commit went through and only its answer was lost: the result is the user's
                log.warning("task %s: the database committed the result but its answer was lost", task["id"])
                return "completed"
            if done is False:  # unknown (database unreachable): keep them; the task's end removes orphans
                await _remove_quietly([path for _, path in uploaded])
        raise
    log.info("task %s completed with %d output(s)", task["id"], len(uploaded))
    return "completed"


async def _completed_by(task_id: str, attempt: int) -> bool | None:
    """这次尝试是否已把任务完成（提交成功但应答丢失时为真）；数据库不可达或久等不到那次提交 → None"""
    try:
        async with db.transaction() as conn:
            # A COMMIT sent before the connection died may still be landing, holding the task's row: a plain read
            # would see the task unfinished and the caller would remove a result it then points to. A locking read
            # waits for that transaction to end, within a bound (past it the answer is unknown).
            await conn.execute(f"set local lock_timeout = '{COMMIT_WAIT_S}s'")
            cur = await conn.execute("select status, attempts from public.tasks where id = %s for share", (task_id,))
            row = await cur.fetchone()
    except Exception as exc:
        log.warning("task %s: could not tell whether its result was saved: %s", task_id, exc)
        return None
    return bool(row) and row["status"] == "completed" and row["attempts"] == attempt


async def _fail(task: dict, attempt: int, code: str, message: str, *, status: str = "failed") -> str:
    """把任务标为失败（或取消）并退款；任务已在别处结束或已不存在时什么也不改，返回 'canceled'"""
    try:
        row = await db.fetch_one(
            "select public.finish_task(%s, %s, null, null, %s::jsonb, %s, %s) as r",
            (task["id"], status, json.dumps({"code": code, "message": message}), message, attempt),
        )
    except psycopg.Error as exc:
        if exc.sqlstate != TASK_GONE:
            raise
        # Its outputs, if any were uploaded, were removed when saving them failed on the missing rows.
        log.info("task %s no longer exists (its account was deleted); stopping (%s)", task["id"], code)
        return "canceled"
    if row["r"]["changed"]:
        return status
    log.info("task %s finished elsewhere; this attempt's failure (%s) changes nothing", task["id"], code)
    return "canceled"


async def _hold_probed_upload(conn, ctx: JobContext) -> None:
    """在保存结果的事务里锁住被探测的上传（删除它要等提交）；它已被删除 → UploadGone，海报不入库"""
    cur = await conn.execute("select 1 from public.assets where id = %s for share", (str(ctx.params.asset_id),))
    if await cur.fetchone() is None:
        raise UploadGone(str(ctx.params.asset_id))


async def _settle_probe(task: dict, ctx: JobContext, *, reason: str | None) -> None:
    from lib.assets import get_asset_service

    asset_id = str(ctx.params.asset_id)
    if reason is not None:  # the file is of no use: removed with its verdict
        await get_asset_service().reject_upload(asset_id=asset_id, reason=reason)
    else:
        await get_asset_service().mark_probed(asset_id=asset_id, probe=ctx.result.get("probe"), reason=None)


async def _input_assets(task: dict) -> dict[str, dict]:
    ids = [str(i) for i in task.get("input_asset_ids") or []]
    if not ids:
        return {}
    rows = await db.fetch_all(
        "select * from public.assets where id = any(%s::uuid[]) and user_id = %s", (ids, task["user_id"])
    )
    found = {str(r["id"]): {**r, "id": str(r["id"])} for r in rows}
    missing = [i for i in ids if i not in found]
    if missing:
        raise InvalidInput("An input file of this task was deleted before it could run.")
    return {i: found[i] for i in ids}


async def _remove_quietly(paths: list[str]) -> None:
    from lib.storage import get_storage

    try:
        await get_storage().remove(paths=paths)
    except Exception as exc:
        log.warning("could not remove discarded outputs %s: %s", paths, exc)


HANDLER_THREAD = "spool-handler"


async def _in_handler_thread(handler, ctx: JobContext) -> list[OutputFile]:
    """在独立的守护线程里运行处理器（超时后不必等它：asyncio.run 只等默认线程池）"""
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    context = contextvars.copy_context()

    def work() -> None:
        try:
            result = context.run(handler, ctx)
        except BaseException as exc:  # handed to the awaiting coroutine, like asyncio.to_thread
            outcome = (done.set_exception, exc)
        else:
            outcome = (done.set_result, result)
        if not loop.is_closed():
            loop.call_soon_threadsafe(lambda: done.cancelled() or outcome[0](outcome[1]))

    threading.Thread(target=work, name=f"{HANDLER_THREAD}-{ctx.task_id[:8]}", daemon=True).start()
    return await done


def handler_still_running() -> bool:
    """是否有超时被放弃、仍在运行的处理器线程"""
    return any(t.name.startswith(HANDLER_THREAD) and t.is_alive() for t in threading.enumerate())


def wait_for_handlers(timeout: float) -> bool:
    """等仍在运行的处理器线程结束，至多 timeout 秒；返回是否都已结束"""
    deadline = time.monotonic() + timeout
    for thread in [t for t in threading.enumerate() if t.name.startswith(HANDLER_THREAD)]:
        thread.join(max(0.0, deadline - time.monotonic()))
    return not handler_still_running()


def _device() -> str:
    from gpu_jobs.media.device import pick_device

    return pick_device()


def run_task(task_id: str, *, call_id: str | None = None) -> str:
    """同步入口（Modal 函数与命令行调用）"""

    async def main() -> str:
        try:
            return await run_task_async(task_id, call_id=call_id)
        finally:
            await db.close_pool()

    return asyncio.run(main())
