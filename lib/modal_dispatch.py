"""Modal dispatch: spawn the task's Modal function by name, keep the call id on the task, cancel the call.

The deployed app (`modal_app.py`) has one job function per GPU class and per CPU pool of the catalog;
`function_for(model_key)` names the one a model runs on, so the dispatcher and the app agree.
"""

from __future__ import annotations

import asyncio
import logging
import re

import modal

from lib import catalog, db
from lib.config import get_settings

log = logging.getLogger("spool.dispatch")

# Functions no model runs on any more, kept deployed so that the calls spawned before a change still run: name →
# the class whose limits they keep. run_cpu ran upload checks and provider jobs alike before they had pools.
RETIRED_FUNCTIONS: dict[str, str] = {"run_cpu": "provider"}
SPAWN_TIMEOUT_S = 10.0  # a spawn only enqueues; past this the task stays queued and the reaper retries
CANCEL_TIMEOUT_S = 10.0
ENDED = ("completed", "failed", "canceled")


def function_name(job_class: str) -> str:
    """GPU 类别或 CPU 池对应的 Modal 函数名"""
    return "run_" + re.sub(r"[^0-9a-z]+", "_", job_class.lower()).strip("_")


def job_class(model_key: str) -> str:
    """模型在哪一类容器里运行：其 GPU 类别，没有 GPU 时其 CPU 池"""
    return catalog.get_model(model_key).job_class


def function_for(model_key: str) -> str:
    """模型对应的 Modal 函数名"""
    return function_name(job_class(model_key))


def job_functions() -> dict[str, str]:
    """部署的任务函数：函数名 → 类别（每个 GPU 类别与 CPU 池一个，外加退役但仍部署的函数）"""
    functions = {function_name(name): name for name in (*catalog.GPU_CLASSES, *catalog.CPU_POOLS)}
    return functions | RETIRED_FUNCTIONS


class ModalDispatcher:
    """Modal 调度：spawn 任务所属的函数并记录 call id；不等待任务本身"""

    def __init__(self, app_name: str | None = None) -> None:
        self.app_name = app_name or get_settings().modal_app_name
        self._functions: dict[str, modal.Function] = {}  # a handle looks the function up once, then is reused

    async def dispatch(self, *, task_id: str, model_key: str) -> None:
        """派发任务：认领派发，spawn 并记下 call id（失败时抛出，任务保持排队）；任务在 spawn 期间已结束 → 取消该调用"""
        claim = await db.fetch_one("select public.start_task_dispatch(%s) as claimed", (task_id,))
        if not claim["claimed"]:  # another dispatcher is spawning it or has, or it left the queue
            log.info("task %s: not spawned, another dispatcher has it or it is no longer waiting", task_id)
            return
        name = function_for(model_key)
        function = self._functions.get(name)
        if function is None:
            function = self._functions[name] = modal.Function.from_name(self.app_name, name)
        async with asyncio.timeout(SPAWN_TIMEOUT_S):
            call = await function.spawn.aio(task_id)
        task = await db.fetch_one("select * from public.set_task_dispatch(%s, %s, null)", (task_id, call.object_id))
        log.info("task %s spawned on %s/%s as %s", task_id, self.app_name, name, call.object_id)
        if task is None or (task["status"] in ENDED and task["call_id"] != call.object_id):
            # Canceled (or ended) while the spawn was in flight: the cancel found no call to stop, and this one has
            # nothing to run. Its input is canceled before it waits for a GPU; a container it already holds is kept.
            log.info("task %s ended during its spawn; canceling call %s", task_id, call.object_id)
            try:
                await self.cancel(task_id=task_id, call_id=call.object_id, terminate=False)
            except Exception as exc:  # the call's claim finds the task ended and exits
                log.warning("task %s: could not cancel call %s: %s", task_id, call.object_id, exc)

    async def cancel(self, *, task_id: str, call_id: str | None, terminate: bool = True) -> None:
        """取消任务对应的 Modal 调用（没有 call id 时无事可做）；terminate=False 也取消运行中的输入，只是不结束其容器"""
        if not call_id:
            return
        call = modal.FunctionCall.from_id(call_id)
        async with asyncio.timeout(CANCEL_TIMEOUT_S):
            # Stop the container, not just the input: a canceled job has nothing left to save (the task is
            # already refunded), and a container that only saw its input canceled keeps the handler thread running.
            await call.cancel.aio(terminate_containers=terminate)
        log.info("task %s: Modal call %s canceled", task_id, call_id)

    async def call_pending(self, *, call_id: str) -> bool:
        """Modal 调用是否仍在排队或运行（已结束：返回、失败、超时、被取消或结果已过期 → False；问不到 → 抛出）"""
        call = modal.FunctionCall.from_id(call_id)
        try:
            async with asyncio.timeout(CANCEL_TIMEOUT_S):
                await call.get.aio(timeout=0)  # a poll: no output yet is Python's TimeoutError
        except TimeoutError:  # still queued or running (or Modal was slow to answer: asked again later)
            return True
        except _could_not_ask():
            raise  # Modal unreachable or refusing: the caller keeps the call and asks again
        except Exception as exc:  # the call's own end: the job's error, Modal's timeout, a cancel, an expired output
            log.info("Modal call %s has ended (%s)", call_id, type(exc).__name__)
        return False


def _could_not_ask() -> tuple[type[BaseException], ...]:
    """Errors that say nothing about the call, only that Modal could not be asked."""
    from grpclib.exceptions import StreamTerminatedError
    from modal import exception as errors

    return (
        errors.ConnectionError,
        errors.ServiceError,
        errors.AuthError,
        errors.ClientClosed,
        errors.InternalError,
        errors.ResourceExhaustedError,
        errors.PermissionDeniedError,
        StreamTerminatedError,  # not GRPCError: NotFoundError and InvalidError are its kind, and they are answers
    )
