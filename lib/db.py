"""Async Postgres access: one lazily opened pool, transactions, and queries run as a user."""

from __future__ import annotations

import asyncio
import json
import time
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg.pq import TransactionStatus
from psycopg.rows import dict_row
from psycopg.types.datetime import TimestamptzLoader
from psycopg_pool import AsyncConnectionPool

from lib.config import get_settings
from lib.errors import ACCOUNT_GONE, Unauthorized

# A user's queries stop after this, as Supabase's authenticated role does through PostgREST (set_config('role')
# does not load a role's settings): one slow query cannot hold a pooled connection for minutes.
USER_STATEMENT_TIMEOUT = "8s"

# One pool per event loop: the API and the worker run one loop, but a sync entry point
# (Modal's run_task, a CLI command) runs its own loop and must not take over another's pool.
_pools: dict[asyncio.AbstractEventLoop, asyncio.Future[AsyncConnectionPool]] = {}


def connect_kwargs() -> dict[str, Any]:
    # prepare_threshold=None: no server-side prepared statements, so Supavisor's
    # transaction-mode pooler (and PgBouncer) work.
    kwargs: dict[str, Any] = {"prepare_threshold": None, "row_factory": dict_row, "autocommit": True}
    if sslmode := get_settings().db_sslmode():
        kwargs["sslmode"] = sslmode
    return kwargs


class UtcTimestamptzLoader(TimestamptzLoader):
    """timestamptz 一律读成 UTC，与会话的 TimeZone 无关"""

    # psycopg reads times in the session's zone, which follows the database's default (a Supabase project set to
    # local time, or a local initdb that took the machine's zone): the API's times are UTC either way. A startup
    # option cannot fix the session's zone behind Supavisor, which does not pass it on.
    def load(self, data) -> datetime:
        return super().load(data).astimezone(UTC)


async def _read_times_as_utc(conn: psycopg.AsyncConnection) -> None:
    conn.adapters.register_loader("timestamptz", UtcTimestamptzLoader)


class Pool(AsyncConnectionPool):
    """连接池：只在连接闲置过久后才于借出前检查它"""

    # The check costs a round trip, so only a connection that sat idle long enough to have been
    # dropped (by a pooler, a failover or a restart) is checked; a busy one goes straight back to work.
    CHECK_AFTER_IDLE_SECONDS = 5.0

    def __init__(self, url: str, *, min_size: int, max_size: int, timeout: float = 30.0):
        self._returned_at: weakref.WeakKeyDictionary[psycopg.AsyncConnection, float] = weakref.WeakKeyDictionary()
        super().__init__(
            url,
            min_size=min_size,
            max_size=max_size,
            kwargs=connect_kwargs(),
            open=False,
            check=self._check_if_idle,
            configure=_read_times_as_utc,
            timeout=timeout,  # waiting longer for a connection only piles requests up: a 503 says "try again"
        )

    async def _check_if_idle(self, conn: psycopg.AsyncConnection) -> None:
        returned = self._returned_at.get(conn)
        if returned is None or time.monotonic() - returned > self.CHECK_AFTER_IDLE_SECONDS:
            await self.check_connection(conn)

    async def putconn(self, conn: psycopg.AsyncConnection) -> None:
        self._returned_at[conn] = time.monotonic()
        await super().putconn(conn)


async def _open_pool() -> AsyncConnectionPool:
    settings = get_settings()
    if not settings.supabase_db_url:
        raise RuntimeError("SUPABASE_DB_URL is not set")
    pool = Pool(
        settings.supabase_db_url,
        min_size=settings.db_pool_min,
        max_size=settings.db_pool_max,
        timeout=settings.db_wait_seconds,
    )
    try:
        await pool.open(wait=True, timeout=settings.db_wait_seconds)
    except BaseException:
        await pool.close()  # its workers would go on trying to connect in the background
        raise
    return pool


async def get_pool() -> AsyncConnectionPool:
    """获取（必要时创建）当前事件循环的数据库连接池"""
    loop = asyncio.get_running_loop()
    opening = _pools.get(loop)
    if opening is None or (opening.done() and opening.exception() is not None):
        opening = _pools[loop] = asyncio.ensure_future(_open_pool())  # concurrent first callers share it
    return await asyncio.shield(opening)


async def close_pool() -> None:
    """关闭当前事件循环的连接池"""
    opening = _pools.pop(asyncio.get_running_loop(), None)
    if opening is not None and opening.done() and opening.exception() is None:
        await opening.result().close()


@asynccontextmanager
async def connection() -> AsyncIterator[psycopg.AsyncConnection]:
    """借用一个自动提交的连接"""
    pool = await get_pool()
    async with pool.connection() as conn:
        yield conn


@asynccontextmanager
async def transaction() -> AsyncIterator[psycopg.AsyncConnection]:
    """在一个事务中执行（退出时提交，异常时回滚）"""
    async with connection() as conn, conn.transaction():
        yield conn


@asynccontextmanager
async def as_user(user_id: str, claims: dict | None = None) -> AsyncIterator[psycopg.AsyncConnection]:
    """以用户身份执行（与 PostgREST 相同：authenticated 角色 + JWT claims），由 RLS 把关；账户已删除 → 401"""
    claims = {"sub": user_id, "role": "authenticated", **(claims or {})}
    # Pipeline mode with no sync point until the end: BEGIN, the account check, the claims, the caller's queries
    # and COMMIT travel in one round trip when the caller reads its results after the block (a read inside it
    # costs one more). A failed statement makes the server skip the rest, COMMIT included.
    async with connection() as conn:
        try:
            async with conn.pipeline():
                await conn.execute("begin")
                # A token outlives its deleted user by up to an hour: checked first, so such a query never runs.
                await conn.execute("select public.require_account(%s)", (user_id,))
                await conn.execute(
                    "select set_config('role', 'authenticated', true), set_config('request.jwt.claims', %s, true),"
                    " set_config('statement_timeout', %s, true)",
                    (json.dumps(claims), USER_STATEMENT_TIMEOUT),
                )
                yield conn
                await conn.execute("commit")
        except psycopg.Error as exc:
            if exc.sqlstate == "SP401":
                raise Unauthorized(ACCOUNT_GONE) from None
            raise
        finally:
            if conn.info.transaction_status in (TransactionStatus.INTRANS, TransactionStatus.INERROR):
                await conn.rollback()  # an error, or the caller's exception: nothing it did is kept


async def fetch_many_as(user_id: str, *queries: tuple[str, Any]) -> list[list[dict]]:
    """以用户身份执行多条查询（一次往返，RLS 把关），返回每条查询的所有行"""
    async with as_user(user_id) as conn:
        cursors = [await conn.execute(sql, params) for sql, params in queries]
    return [await cur.fetchall() for cur in cursors]


async def fetch_one_as(user_id: str, sql: str, params: Any = None) -> dict | None:
    """以用户身份查询第一行（RLS 把关）"""
    [rows] = await fetch_many_as(user_id, (sql, params))
    return rows[0] if rows else None


async def fetch_all_as(user_id: str, sql: str, params: Any = None) -> list[dict]:
    """以用户身份查询所有行（RLS 把关）"""
    [rows] = await fetch_many_as(user_id, (sql, params))
    return rows


async def fetch_one(sql: str, params: Any = None) -> dict | None:
    """执行查询并返回第一行"""
    async with connection() as conn:
        cur = await conn.execute(sql, params)
        return await cur.fetchone()


async def fetch_all(sql: str, params: Any = None) -> list[dict]:
    """执行查询并返回所有行"""
    async with connection() as conn:
        cur = await conn.execute(sql, params)
        return await cur.fetchall()


async def execute(sql: str, params: Any = None) -> None:
    """执行语句"""
    async with connection() as conn:
        await conn.execute(sql, params)


@contextmanager
def user_must_exist():
    """用户请求的写入：令牌仍有效而用户已删除（user_id 外键失败）→ 401"""
    # A token outlives its user by up to an hour; the insert's user_id reference is where that shows.
    try:
        yield
    except psycopg.errors.ForeignKeyViolation as exc:
        if (exc.diag.constraint_name or "").endswith("_user_id_fkey"):
            raise Unauthorized(ACCOUNT_GONE) from None
        raise
