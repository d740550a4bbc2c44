"""The connection pool: a connection the server dropped while it sat idle is replaced; users' queries are bounded."""

import psycopg
import pytest

from lib import db
from tests.factories import connect


async def _backend_pid(pool) -> int:
    async with pool.connection() as conn:
        return (await (await conn.execute("select pg_backend_pid() as pid")).fetchone())["pid"]


async def test_an_idle_connection_dropped_by_the_server_is_replaced(postgres, monkeypatch):
    async with db.Pool(postgres, min_size=1, max_size=1) as pool:
        dropped = await _backend_pid(pool)
        with connect() as admin:
            admin.execute("select pg_terminate_backend(%s)", (dropped,))
        monkeypatch.setattr(pool, "CHECK_AFTER_IDLE_SECONDS", 0.0)  # it has now sat idle long enough
        assert await _backend_pid(pool) != dropped


async def test_a_busy_connection_skips_the_check(postgres, monkeypatch):
    checks = []
    real = db.Pool.check_connection
    monkeypatch.setattr(db.Pool, "check_connection", staticmethod(lambda c: checks.append(c) or real(c)))
    async with db.Pool(postgres, min_size=1, max_size=1) as pool:
        first = await _backend_pid(pool)
        assert len(checks) == 1  # a connection never used before is checked
        assert [await _backend_pid(pool) for _ in range(5)] == [first] * 5
        assert len(checks) == 1


async def test_a_users_query_stops_at_the_statement_timeout(make_user, monkeypatch):
    user = await make_user()
    monkeypatch.setattr(db, "USER_STATEMENT_TIMEOUT", "200ms")
    with pytest.raises(psycopg.errors.QueryCanceled):
        await db.fetch_one_as(user.id, "select pg_sleep(5)")
    assert (await db.fetch_one_as(user.id, "select 1 as ok"))["ok"] == 1  # the connection is fine afterwards
