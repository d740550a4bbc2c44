"""Test session: a real embedded Postgres, the local server in its own process, and small factories."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from lib.config import get_settings
from lib.local import stack

ROOT = Path(__file__).resolve().parents[1]


# Settings must be in the environment before anything reads get_settings() (it caches them).
_HOME = Path(tempfile.mkdtemp(prefix="spool-test-"))
_PORT = stack.free_port()
os.environ.update(
    {
        "SPOOL_ENV_FILE": "",  # no .env: a developer's settings there (Kling keys, a cloud database) stay out
        "SPOOL_MODE": "local",
        "SPOOL_HOME": str(_HOME),
        "SPOOL_HOST": "127.0.0.1",
        "SPOOL_PORT": str(_PORT),
        "SIGNUP_CREDITS": "100",
        "LOG_LEVEL": "WARNING",
        "TASK_STALL_SECONDS": "30",
        "STRIPE_SECRET_KEY": "sk_test_local",
        "STRIPE_WEBHOOK_SECRET": "whsec_test_local",
    }
)
for name in ("SUPABASE_URL", "SUPABASE_DB_URL", "SUPABASE_SERVICE_ROLE_KEY", "SUPABASE_JWT_SECRET"):
    os.environ.pop(name, None)


MONEY_TABLES = "auth.users, public.stripe_events, public.departed_users"


@pytest.fixture(scope="session")
def postgres():
    """嵌入式 Postgres（整个测试会话一个）"""
    with stack.prepared():
        yield get_settings().supabase_db_url


@pytest.fixture(scope="session")
def base_url(postgres) -> str:
    return stack.local_base_url()


@pytest.fixture(scope="session")
def live_server(postgres, base_url):
    """本地服务器（独立进程：JWKS、存储、实时）"""
    proc = stack.start_server(base_url, log_path=_HOME / "server.log")
    yield base_url
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="session")
def app(live_server):
    from lib.local.server import create_local_app

    return create_local_app()


@pytest.fixture
async def client(app):
    """通过 ASGI 调用 API 的 HTTP 客户端"""
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://spool.test") as c:
        yield c


class User:
    def __init__(self, user_id: str, token: str, email: str):
        self.id, self.token, self.email = user_id, token, email

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.token}"}


@pytest.fixture
def make_user(client):
    """创建本地用户（通过 POST /dev/users，触发注册赠送）"""
    counter = iter(range(10_000))

    async def make(email: str | None = None) -> User:
        email = email or f"user{next(counter)}-{time.monotonic_ns()}@example.com"
        resp = await client.post("/dev/users", json={"email": email})
        assert resp.status_code == 200, resp.text
        data = resp.json()["data"]
        return User(data["user_id"], data["access_token"], email)

    return make


@pytest.fixture
async def db_conn(postgres):
    """一个自动提交的同步外连接（以表所有者身份）"""
    import psycopg
    from psycopg.rows import dict_row

    with psycopg.connect(postgres, autocommit=True, row_factory=dict_row) as conn:
        yield conn


@pytest.fixture(autouse=True)
def clean_database(request):
    """每个测试后：检查 balance = sum(ledger)，然后清空数据"""
    yield
    if (
        "postgres" not in request.fixturenames
        and "live_server" not in request.fixturenames
        and "client" not in request.fixturenames
    ):
        return
    import psycopg

    with psycopg.connect(get_settings().supabase_db_url, autocommit=True) as conn:
        broken = conn.execute(
            "select a.user_id, a.balance, coalesce(sum(l.delta), 0) from public.credit_accounts a"
            " left join public.credit_ledger l on l.user_id = a.user_id"
            " group by a.user_id, a.balance having a.balance <> coalesce(sum(l.delta), 0)"
        ).fetchall()
        conn.execute(f"truncate {MONEY_TABLES} cascade")
    assert not broken, f"balance != sum(ledger) for {broken}"
