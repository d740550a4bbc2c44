"""The connection pool: a connection the server dropped while it sat idle is replaced; users' queries are bounded."""

import psycopg
import pytest

from lib import db
from lib.errors import Unauthorized
from tests.factories import RoundTrips, connect, sql


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


@pytest.fixture
def round_trips(monkeypatch, tmp_path):
    return RoundTrips(monkeypatch, tmp_path)


async def test_a_users_request_is_one_round_trip(client, make_user, round_trips):
    """以用户身份的读取：BEGIN、账户检查、claims、查询与 COMMIT 一次往返（经 Supavisor 每次往返都是网络）"""
    user = await make_user()
    round_trips.clear()
    assert (await client.get("/credits", headers=user.headers)).json()["data"] == {"balance": 100}
    assert round_trips.count == 1
    assert round_trips.statements[0] == "begin" and round_trips.statements[-1] == "commit"
    round_trips.clear()
    first, second = await db.fetch_many_as(user.id, ("select 1 as a", None), ("select 2 as b", None))
    assert (first, second) == ([{"a": 1}], [{"b": 2}])
    assert round_trips.count == 1


async def test_a_failed_users_request_keeps_nothing(make_user):
    """以用户身份的请求失败（调用方的异常或语句出错）→ 整个事务回滚"""
    user = await make_user()
    insert = "insert into public.projects (user_id, name) values (%s, 'kept?')"
    with pytest.raises(RuntimeError):
        async with db.as_user(user.id) as conn:
            await conn.execute(insert, (user.id,))
            raise RuntimeError("the caller gave up")
    with pytest.raises(psycopg.errors.DivisionByZero):
        async with db.as_user(user.id) as conn:
            await conn.execute(insert, (user.id,))
            await conn.execute("select 1 / 0")
    assert sql("select name from public.projects where user_id = %s", (user.id,)) == []
    assert (await db.fetch_one_as(user.id, "select count(*) as n from public.projects"))["n"] == 0


async def test_a_deleted_accounts_query_never_runs(make_user):
    """令牌比被删除的用户活得久：账户检查在查询之前，失败后查询不执行"""
    user = await make_user()
    sql("delete from auth.users where id = %s", (user.id,))
    with pytest.raises(Unauthorized):
        await db.fetch_one_as(user.id, "select 1 / 0 as never")  # run, it would be a division by zero
