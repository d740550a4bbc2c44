"""Tasks: create (validate → price → one SQL call → dispatch), read, list and cancel."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from functools import cache

from lib import catalog, db
from lib.config import get_settings
from lib.credits import get_credit_service
from lib.dispatch import get_dispatcher
from lib.errors import Conflict, InvalidInput, NotFound, ProviderUnavailable
from lib.paging import page_after, page_of

log = logging.getLogger("spool.tasks")

TERMINAL = ("completed", "failed", "canceled")
SWEEP_BATCH = 100  # ended tasks whose leftovers one reaper pass sweeps
PROBE_KEY_PREFIX = "probe:"  # the server's own idempotency keys (an upload's probe task); reserved
# The note a failed spawn leaves on its task; set_task_dispatch removes exactly this text once a spawn succeeds.
DISPATCH_RETRY_NOTE = "Waiting for a worker (dispatch will be retried)."
PUBLIC_COLUMNS = (
    "id, project_id, model_key, params, status, progress, message, cost, input_asset_ids, result, "
    "result_url, error, attempts, created_at, started_at, finished_at, updated_at"
)
# Whether a completed task's result asset is still there (null for a result that names none): a result deleted
# through another process must read as null even where this one remembers its signed URL. A scalar subquery, one
# primary-key probe per row returned (an EXISTS may be planned as a hash of all the user's assets).
RESULT_KEPT = (
    "case when tasks.result ->> 'asset_id' is not null then (select true from public.assets a"
    " where a.id = (tasks.result ->> 'asset_id')::uuid) is not null end as result_kept"
)
# A page of the caller's tasks (RLS); a project's page reads tasks_project_created_idx (migration 20261208008200).
TASK_PAGE = (
    f"select {PUBLIC_COLUMNS}, {RESULT_KEPT} from public.tasks"
    " where (%(status)s::text is null or status = %(status)s)"
    " and (%(project)s::uuid is null or project_id = %(project)s)"
    " and (%(at)s::timestamptz is null or (created_at, id) < (%(at)s, %(id)s::uuid))"
    " order by created_at desc, id desc limit %(limit)s"
)


class TaskService:
    """任务服务"""

    async def create_task(
        self,
        *,
        user_id: str,
        model_key: str,
        params: dict,
        project_id: str | None = None,
        idempotency_key: str | None = None,
    ) -> tuple[dict, bool]:
        """创建任务并扣除积分；返回 (任务, 是否新建)。重放由 create_task SQL 按幂等键返回原任务"""
        if idempotency_key and idempotency_key.startswith(PROBE_KEY_PREFIX):
            raise InvalidInput(
                f"Idempotency-Key values starting with '{PROBE_KEY_PREFIX}' are reserved; please choose another key.",
                details=[{"field": "header.Idempotency-Key", "message": "reserved prefix"}],
            )
        spec = runnable_model(model_key)
        settings = get_settings()
        valid = catalog.validate_params(spec, params)
        stored_params = valid.model_dump(mode="json")
        request = (model_key, stored_params, project_id)
        credits = get_credit_service()
        try:
            require_available(spec)
            assets = await self._input_assets(user_id, spec, valid, project_id=project_id)
            cost = credits.calculate_credits(model_key=model_key, params=valid, assets=assets)  # checks the limits
        except (NotFound, InvalidInput, ProviderUnavailable):
            # A replay whose input or project was deleted since, or that today's limits or providers would refuse:
            # the first answer still stands.
            earlier = idempotency_key and await self._keyed_task(user_id, idempotency_key)
            if earlier:
                [task] = await with_fresh_result_urls([_same_request(earlier, request)])
                return task, False
            raise
        outcome = await credits.consume_credits(
            user_id=user_id,
            model_key=model_key,
            params=stored_params,
            cost=cost,
            idempotency_key=idempotency_key,
            project_id=project_id,
            input_asset_ids=list(assets),
            max_active=settings.max_active_tasks_per_user,
        )
        if not outcome["created"]:
            [task] = await with_fresh_result_urls([_same_request(outcome["task"], request)])
            return task, False
        task = public_task(outcome["task"])
        await self.dispatch(task_id=task["id"], model_key=model_key)
        return task, True

    async def quote(self, *, user_id: str, model_key: str, params: dict, input_asset_ids=None) -> dict:
        """报价：与创建任务相同的校验与计价，但不扣费"""
        spec = require_available(runnable_model(model_key))
        valid = catalog.validate_params(spec, params)
        named = set(spec.input_asset_ids(valid))
        if input_asset_ids is not None and {str(i) for i in input_asset_ids} != named:
            raise InvalidInput(
                "input_asset_ids must match the assets named in params.",
                details=[{"field": "input_asset_ids", "message": "does not match params"}],
            )
        assets = await self._input_assets(user_id, spec, valid)
        credits = get_credit_service()
        cost = credits.calculate_credits(model_key=model_key, params=valid, assets=assets)
        balance = await credits.get_balance(user_id=user_id)
        return {"model_key": model_key, "credits": cost, "balance": balance, "affordable": balance >= cost}

    async def dispatch(self, *, task_id: str, model_key: str) -> None:
        """派发任务；失败时任务保持排队，由回收器重新派发（从不抛出：任务已创建并扣费）；模型已下线 → 失败并退款"""
        if model_key not in catalog.CATALOG:  # queued before a deploy removed its model: nothing can ever run it
            message = "This model is no longer offered; your credits were refunded."
            await db.execute(
                "select public.finish_task(%s, 'failed', null, null, %s::jsonb, %s, null)",
                (task_id, json.dumps({"code": "model_unavailable", "message": message}), message),
            )
            return
        try:
            await get_dispatcher().dispatch(task_id=task_id, model_key=model_key)
        except Exception:
            log.exception("dispatch of task %s failed; the reaper will retry", task_id)
            try:
                await db.execute(
                    "select public.set_task_dispatch(%s, null, %s)",
                    (task_id, DISPATCH_RETRY_NOTE),
                )
            except Exception as exc:  # the reaper finds the task without a call either way
                log.warning("task %s: could not note the failed dispatch: %s", task_id, exc)

    async def get_task(self, *, user_id: str, task_id: str) -> dict:
        """查询自己的一个任务（结果地址重新签名或交出仍够新的）"""
        [task] = await with_fresh_result_urls([await self._own_task(user_id, task_id)])
        return task

    async def _keyed_task(self, user_id: str, idempotency_key: str) -> dict | None:
        return await db.fetch_one_as(
            user_id,
            f"select {PUBLIC_COLUMNS}, requested_project_id from public.tasks where idempotency_key = %s",
            (idempotency_key,),
        )

    async def _own_task(self, user_id: str, task_id: str) -> dict:
        row = await db.fetch_one_as(
            user_id, f"select {PUBLIC_COLUMNS}, {RESULT_KEPT} from public.tasks where id = %s", (task_id,)
        )
        if row is None:
            raise NotFound("Task not found.")
        return row

    async def list_tasks(
        self,
        *,
        user_id: str,
        status: str | None = None,
        project_id: str | None = None,
        limit: int = 20,
        cursor: str | None = None,
    ) -> dict:
        """任务列表（最新在前，游标分页）"""
        rows = await db.fetch_all_as(
            user_id,
            TASK_PAGE,
            {"status": status, "project": project_id, **page_after(cursor), "limit": limit + 1},
        )
        page = page_of(rows, limit)
        return {**page, "items": await with_fresh_result_urls(page["items"])}

    async def cancel_task(self, *, user_id: str, task_id: str) -> dict:
        """取消排队中或处理中的任务并退款；再次取消已取消的任务照样回答它（重试安全）；已完成或失败 → 409"""
        task = await self._own_task(user_id, task_id)
        if task["status"] == "canceled":  # a retry of a cancel whose answer was lost: it did cancel
            return public_task(task)  # as the first answer (a canceled task has no result to sign)
        if task["status"] in TERMINAL:
            raise Conflict(f"The task is already {task['status']}.")
        spec = catalog.CATALOG.get(task["model_key"])
        if spec is not None and not spec.public:  # an upload's check: stopping it would strand the asset
            raise Conflict("This task checks an upload and cannot be canceled; delete the asset instead.")
        outcome = await get_credit_service().refund(
            task_id=task_id,
            status="canceled",
            error={"code": "canceled", "message": "Canceled by the user."},
            message="Canceled.",
        )
        if not outcome["changed"]:
            if outcome["task"]["status"] == "canceled":  # two cancels at once: both did what was asked
                return public_task(outcome["task"])
            raise Conflict(f"The task is already {outcome['task']['status']}.")
        try:
            await get_dispatcher().cancel(task_id=task_id, call_id=outcome["task"].get("call_id"))
        except Exception:
            log.warning("could not cancel the running job of task %s; it stops at its next progress point", task_id)
        await self.discard_orphaned_outputs(task_id=task_id)  # a killed job may have left files behind
        return public_task(outcome["task"])

    async def discard_orphaned_outputs(self, *, task_id: str) -> int:
        """删除已结束任务在存储里留下、却没有资源行引用的文件（被杀死的尝试上传到一半的产出）；返回删除数"""
        try:
            return await self._remove_leftovers(task_id)
        except Exception as exc:  # housekeeping: never fails the caller (the reaper tries again later)
            log.warning("task %s: could not remove leftover files: %s", task_id, exc)
            return 0

    async def sweep_task_leftovers(self, *, after_seconds: int, limit: int = SWEEP_BATCH) -> int:
        """清扫结束已久的任务留下的文件（结束时那一次删除可能失败或漏掉）；成功才忘掉该任务；返回删除的文件数"""
        rows = await db.fetch_all(
            "select task_id from public.take_task_output_sweeps(%s, %s) as task_id", (after_seconds, limit)
        )
        removed = 0
        for row in rows:
            task_id = str(row["task_id"])
            try:
                removed += await self._remove_leftovers(task_id)
                await db.execute("select public.forget_task_output_sweep(%s)", (task_id,))
            except Exception as exc:  # kept: a later pass tries again
                log.warning("task %s: could not sweep leftover files: %s", task_id, exc)
        return removed

    async def _remove_leftovers(self, task_id: str) -> int:
        from lib.storage import get_storage

        task = await db.fetch_one("select user_id, status, attempts from public.tasks where id = %s", (task_id,))
        if task is None or not task["attempts"]:
            return 0  # never ran: nothing was uploaded
        if task["status"] not in TERMINAL:
            return 0  # an attempt may still be uploading: only a finished task's leftovers are known to be orphans
        storage = get_storage()
        files = await storage.list_files(prefix=f"{task['user_id']}/tasks/{task_id}")
        kept = await db.fetch_all("select path from public.assets where path = any(%s)", (files,))
        orphans = sorted(set(files) - {row["path"] for row in kept})
        if orphans:
            await storage.remove(paths=orphans)
            log.info("task %s: removed %d file(s) no asset refers to", task_id, len(orphans))
        return len(orphans)

    async def _input_assets(
        self, user_id: str, spec: catalog.ModelSpec, params, *, project_id: str | None = None
    ) -> dict[str, dict]:
        """读取任务的输入资源并检查它们（以及所要的项目）属于该用户，一次往返"""
        ids = spec.input_asset_ids(params)
        queries = []
        if ids:
            queries.append(
                (
                    "select id, kind, status, width, height, duration_s, fps, mime, bytes, bucket, path"
                    " from public.assets where id = any(%s::uuid[])",
                    (ids,),
                )
            )
        if project_id:
            queries.append(("select id from public.projects where id = %s", (project_id,)))
        results = await db.fetch_many_as(user_id, *queries) if queries else []
        rows = results[0] if ids else []
        found = {str(r["id"]): r for r in rows}
        for field, kind in spec.inputs.items():
            asset_id = str(getattr(params, field))
            asset = found.get(asset_id)
            if asset is None:
                raise NotFound(f"Asset {asset_id} not found.")
            if asset["status"] != "ready":
                raise InvalidInput(
                    f"Asset {asset_id} is {asset['status']}, not ready.",
                    details=[{"field": f"params.{field}", "message": "asset not ready"}],
                )
            if asset["kind"] != kind:
                wanted, given = catalog.a_kind(kind), catalog.a_kind(asset["kind"])
                raise InvalidInput(
                    f"This model needs {wanted}, but asset {asset_id} is {given}.",
                    details=[{"field": f"params.{field}", "message": f"expected {wanted}"}],
                )
        if project_id and not results[-1]:
            raise NotFound("Project not found.")
        return {asset_id: found[asset_id] for asset_id in ids}


async def with_fresh_result_urls(tasks: list[dict]) -> list[dict]:
    """已完成任务附上结果的下载地址（重新签名或交出仍够新的；结果资源已被删除 → null），至多一次存储请求"""
    from lib.storage import with_signed_urls

    def result_path(task: dict) -> str | None:
        if task["status"] != "completed" or task.get("result_kept") is False:
            return None
        return (task.get("result") or {}).get("path")

    # A remembered URL only where the row just read shows the result asset is still there.
    signed = await with_signed_urls(tasks, "result_url", result_path, lambda task: task.get("result_kept") is True)
    return [{key: value for key, value in task.items() if key != "result_kept"} for task in signed]


def _same_request(task: dict, request: tuple) -> dict:
    """重放：幂等键对应的任务须来自同一请求（模型、参数、所要的项目，即使它已被删除），否则 409；返回对外字段"""
    project_id = task["requested_project_id"] and str(task["requested_project_id"])
    if (task["model_key"], task["params"], project_id) != request:
        raise Conflict("This Idempotency-Key was already used for a different request.")
    return public_task(task)


def runnable_model(model_key: str) -> catalog.ModelSpec:
    """用户可直接运行的模型（内部模型如探测 → 422）"""
    spec = catalog.get_model(model_key)
    if not spec.public:
        raise InvalidInput(
            f"Model '{model_key}' cannot be run directly.",
            details=[{"field": "model_key", "message": "internal model"}],
        )
    return spec


def require_available(spec: catalog.ModelSpec) -> catalog.ModelSpec:
    """模型此刻可用（外部提供方未配置 → 503）"""
    if not spec.available(get_settings()):
        raise ProviderUnavailable(f"'{spec.title}' is not available right now.")
    return spec


def public_task(row: dict) -> dict:
    """只保留对外字段（SQL 函数返回的 jsonb 行 → 与查询结果同形）"""
    task = {key: row.get(key) for key in PUBLIC_COLUMNS.split(", ")}
    task["progress"] = float(task["progress"] or 0)  # a real, as a query returns it (jsonb gives 0 for 0.0)
    for key in ("created_at", "started_at", "finished_at", "updated_at"):
        if isinstance(task[key], str):
            task[key] = datetime.fromisoformat(task[key]).astimezone(UTC)  # to_jsonb writes the session's zone
    return task


@cache
def get_task_service() -> TaskService:
    """获取任务服务单例"""
    return TaskService()
