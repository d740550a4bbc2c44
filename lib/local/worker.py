"""The local worker: claims queued tasks (FOR UPDATE SKIP LOCKED), woken by NOTIFY, WORKER_CONCURRENCY at a time in
each job class (the GPU jobs, the upload checks, the provider jobs), as the cloud runs each class on its own function:
an upload is checked while a Kling job waits on Kling, and a long video does not hold up a picture's check."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import uuid

import psycopg

from lib import db
from lib.catalog import CATALOG
from lib.config import get_settings
from lib.reaper import reap

log = logging.getLogger("spool.worker")
POLL_SECONDS = 5.0
STOP_SECONDS = 5.0  # on shutdown: how long each running job's cleanup, and then its handler thread, may take


class LocalWorker:
    """本地任务 worker"""

    def __init__(self, concurrency: int | None = None, *, worker_id: str | None = None, lost_worker: str | None = None):
        self.settings = get_settings()
        self.worker_id = worker_id or f"local-worker:{uuid.uuid4()}"
        self.lost_worker = lost_worker
        self.concurrency = concurrency or self.settings.worker_concurrency
        self.wake = asyncio.Event()
        self.stopping = asyncio.Event()
        self.running: dict[asyncio.Task, tuple[str, dict]] = {}  # job → (its class, the claimed task)
        self.classes: dict[str, list[str]] = {}  # claim only what this worker can run, by job class
        for key, spec in CATALOG.items():  # the GPU classes share this machine's one GPU: one class here
            self.classes.setdefault("gpu" if spec.gpu else spec.job_class, []).append(key)

    async def run(self) -> None:
        """运行直到 stop()"""
        from gpu_jobs.runner import run_task_async  # torch and av load here, in the worker only

        self._run_task = run_task_async
        await self._requeue_lost_worker_tasks()
        background = [asyncio.create_task(self._listen()), asyncio.create_task(self._reap_loop())]
        log.info("worker ready (concurrency %d)", self.concurrency)
        try:
            while not self.stopping.is_set():
                await self._fill_slots()
                self.wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), POLL_SECONDS)
        finally:
            for task in background:
                task.cancel()
            await self._release_running()

    def stop(self) -> None:
        """停止领取新任务"""
        self.stopping.set()
        self.wake.set()

    async def _fill_slots(self) -> None:
        for job_class, model_keys in self.classes.items():
            while not self.stopping.is_set() and self._running_in(job_class) < self.concurrency:
                try:
                    task = await db.fetch_one(
                        "select * from public.claim_next_task(%s, %s)", (model_keys, self.worker_id)
                    )
                except psycopg.Error as exc:
                    log.warning("claim failed: %s", exc)
                    return
                if task is None:
                    break
                job = asyncio.create_task(self._run_task(str(task["id"]), claimed=task))
                self.running[job] = (job_class, task)
                job.add_done_callback(self._done)

    def _running_in(self, job_class: str) -> int:
        return sum(1 for running_class, _ in self.running.values() if running_class == job_class)

    async def _requeue_lost_worker_tasks(self) -> None:
        """接替一个已死的 worker 时，立即把它认领的任务放回队列（或在用尽尝试后失败并退款），不等心跳超时"""
        if not self.lost_worker:
            return
        from lib.tasks import get_task_service

        try:
            rows = await db.fetch_all(
                "select * from public.requeue_worker_tasks(%s, %s)", (self.lost_worker, self.settings.task_max_attempts)
            )
        except psycopg.Error as exc:  # the reaper requeues them after TASK_STALL_SECONDS
            log.warning("could not requeue the tasks of the worker that died: %s", exc)
            return
        for row in rows:
            log.warning("task %s of the worker that died: %s", row["task_id"], row["action"])
            if row["action"] == "failed":  # its lost attempt may have left partial uploads
                await get_task_service().discard_orphaned_outputs(task_id=str(row["task_id"]))

    def _done(self, job: asyncio.Task) -> None:
        self.running.pop(job, None)
        self.wake.set()

    async def _release_running(self) -> None:
        """退出时把仍在运行的任务放回队列（归还这次认领用掉的尝试），下次启动立即继续；再等处理器线程停下（有上限）"""
        from gpu_jobs.runner import wait_for_handlers

        running = dict(self.running)
        if not running:
            return
        for job in running:
            job.cancel()
        # A job cut off while saving its result removes what it uploaded (or commits it): that comes first.
        await asyncio.wait(running.keys(), timeout=STOP_SECONDS)
        for _, task in running.values():
            with contextlib.suppress(Exception):
                await db.fetch_one(
                    "select public.release_task(%s, %s, %s)",
                    (task["id"], task["attempts"], "The worker restarted; resuming."),
                )
        # The handlers stop at their next progress call. One still inside native code (torch) when the interpreter
        # finalizes would abort the process; run_worker ends the process at once if one outlasts this wait.
        await asyncio.to_thread(wait_for_handlers, STOP_SECONDS)  # the loop stays free to serve their last writes

    async def _listen(self) -> None:
        """LISTEN spool_task_queued；连接断开时重连"""
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self.settings.supabase_db_url, autocommit=True
                ) as conn:
                    await conn.execute("listen spool_task_queued")
                    self.wake.set()  # catch anything queued while we were not listening
                    async for _ in conn.notifies():
                        self.wake.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("listener lost its connection (%s); reconnecting", exc)
                await asyncio.sleep(1)

    async def _reap_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.reaper_interval_seconds)
            try:
                await reap()
            except Exception as exc:
                log.warning("reaper pass failed: %s", exc)


def run_worker(*, worker_id: str | None = None, lost_worker: str | None = None) -> None:
    """运行 worker，直到 SIGINT/SIGTERM；worker_id：它的认领所带的名字，lost_worker：它接替的已死 worker 的名字"""

    async def main() -> None:
        worker = LocalWorker(worker_id=worker_id, lost_worker=lost_worker)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, worker.stop)
        try:
            await worker.run()
        finally:
            await db.close_pool()

    asyncio.run(main())
    from gpu_jobs.runner import handler_still_running

    if handler_still_running():  # its task is back in the queue already: nothing is left to do but exit
        log.warning("a handler did not stop in time; exiting without waiting for it")
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
