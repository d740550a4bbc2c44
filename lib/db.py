"""Async Postgres access: one lazily opened pool, transactions, and queries run as a user."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from lib.config import get_settings

_pool: AsyncConnectionPool | None = None
_pool_loop: asyncio.AbstractEventLoop | None = None


def connect_kwargs() -> dict[str, Any]:
    # prepare_threshold=None: no server-side prepared statements, so Supavisor's
    # transaction-mode pooler (and PgBouncer) work.
    return {"prepare_threshold": None, "row_factory": dict_row, "autocommit": True}


async def get_pool() -> AsyncConnectionPool:
    """获取（必要时创建）数据库连接池"""
    global _pool, _pool_loop
    loop = asyncio.get_running_loop()
    if _pool is None or _pool_loop is not loop:
        settings = get_settings()
        if not settings.supabase_db_url:
            raise RuntimeError("SUPABASE_DB_URL is not set")
        pool = AsyncConnectionPool(
            settings.supabase_db_url,
            min_size=settings.db_pool_min,
            max_size=settings.db_pool_max,
            kwargs=connect_kwargs(),
            open=False,
            check=AsyncConnectionPool.check_connection,
        )
        await pool.open(wait=True, timeout=30)
        _pool, _pool_loop = pool, loop
    return _pool


async def close_pool() -> None:
    """关闭连接池"""
    global _pool, _pool_loop
    if _pool is not None:
        pool, _pool, _pool_loop = _pool, None, None
        await pool.close()


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
    """以用户身份执行（与 PostgREST 相同：authenticated 角色 + JWT claims），由 RLS 把关"""
    claims = {"sub": user_id, "role": "authenticated", **(claims or {})}
    # Pipeline mode: BEGIN, the claims and the caller's first query travel in one round trip.
    async with connection() as conn, conn.pipeline(), conn.transaction():
        await conn.execute(
            "select set_config('role', 'authenticated', true), set_config('request.jwt.claims', %s, true)",
            (json.dumps(claims),),
        )
        yield conn


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
