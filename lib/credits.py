"""Credits: balances, the ledger, and the money steps of a task, all on the SQL functions."""

from __future__ import annotations

import json
from functools import cache

from psycopg import errors as pg_errors

from lib import catalog, db
from lib.errors import ACCOUNT_GONE, InsufficientCredits, NotFound, TooManyActiveTasks, Unauthorized
from lib.paging import encode_cursor, id_after

SQLSTATE_ERRORS = {
    "SP402": InsufficientCredits,
    "SP429": TooManyActiveTasks,
    "SP404": NotFound,
    "SPA04": NotFound,
    "SPP04": NotFound,
}


def raise_domain_error(exc: pg_errors.Error) -> None:
    """把 SQL 函数的自定义 SQLSTATE 变成领域错误"""
    error = SQLSTATE_ERRORS.get(exc.sqlstate or "")
    if error is None:
        raise exc
    message = {
        "SP402": "Not enough credits for this task.",
        "SP429": "Too many tasks are running; wait for one to finish.",
        "SP404": "No credit account for this user.",
        "SPA04": "An input asset of this task was deleted.",
        "SPP04": "Project not found.",
    }[exc.sqlstate]
    raise error(message) from None


class CreditService:
    """积分服务"""

    def calculate_credits(self, *, model_key: str, params, assets: dict[str, dict]) -> int:
        """计算任务价格（先检查输出限制）"""
        spec = catalog.get_model(model_key)
        return catalog.price_of(spec, params, assets)

    async def get_balance(self, *, user_id: str) -> int:
        """查询余额"""
        row = await db.fetch_one_as(user_id, "select balance from public.credit_accounts")
        if row is None:  # every user has one from sign-up until deletion
            raise Unauthorized(ACCOUNT_GONE)
        return row["balance"]

    async def check_credits(self, *, user_id: str, amount: int) -> bool:
        """余额是否足够"""
        return await self.get_balance(user_id=user_id) >= amount

    async def list_ledger(self, *, user_id: str, limit: int = 50, cursor: str | None = None) -> dict:
        """账本分页（最新在前）"""
        rows = await db.fetch_all_as(
            user_id,
            "select id, delta, kind, task_id, ref, balance_after, created_at from public.credit_ledger"
            " where (%(before)s::bigint is null or id < %(before)s) order by id desc limit %(limit)s",
            {"before": id_after(cursor), "limit": limit + 1},
        )
        next_cursor = encode_cursor({"id": rows[limit - 1]["id"]}) if len(rows) > limit else None
        return {"items": rows[:limit], "next_cursor": next_cursor}

    async def consume_credits(
        self,
        *,
        user_id: str,
        model_key: str,
        params: dict,
        cost: int,
        idempotency_key: str | None = None,
        project_id: str | None = None,
        input_asset_ids: list[str] | None = None,
        max_active: int | None = None,
    ) -> dict:
        """扣除积分并创建任务（一次 SQL 调用，幂等）"""
        try:
            row = await db.fetch_one(
                "select public.create_task(%s, %s, %s::jsonb, %s, %s, %s, %s::uuid[], %s) as r",
                (
                    user_id,
                    model_key,
                    json.dumps(params),
                    cost,
                    idempotency_key,
                    project_id,
                    input_asset_ids or [],
                    max_active,
                ),
            )
        except pg_errors.Error as exc:
            if exc.sqlstate == "SP404":  # no credit account: the token's user was deleted
                raise Unauthorized(ACCOUNT_GONE) from None
            raise_domain_error(exc)
        return row["r"]

    async def grant_credits(self, *, user_id: str, amount: int, kind: str, ref: str) -> dict:
        """发放（或扣回）积分，按 ref 幂等"""
        try:
            return await db.fetch_one(
                "select * from public.grant_credits(%s, %s, %s, %s)", (user_id, amount, kind, ref)
            )
        except pg_errors.Error as exc:
            raise_domain_error(exc)

    async def refund(
        self, *, task_id: str, status: str = "failed", error: dict | None = None, message: str | None = None
    ) -> dict:
        """结束任务为失败/取消并退款（只退一次）"""
        try:
            row = await db.fetch_one(
                "select public.finish_task(%s, %s, null, null, %s::jsonb, %s, null) as r",
                (task_id, status, json.dumps(error) if error else None, message),
            )
        except pg_errors.Error as exc:
            raise_domain_error(exc)
        return row["r"]


@cache
def get_credit_service() -> CreditService:
    """获取积分服务单例"""
    return CreditService()
