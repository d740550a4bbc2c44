"""Small factories that build rows straight in the database (as the table owner)."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg.rows import dict_row

from lib.config import get_settings


def connect() -> psycopg.Connection:
    return psycopg.connect(get_settings().supabase_db_url, autocommit=True, row_factory=dict_row)


def make_asset(
    user_id: str,
    *,
    kind: str = "image",
    width: int = 640,
    height: int = 480,
    status: str = "ready",
    duration_s: float | None = None,
    fps: float | None = None,
    path: str | None = None,
    mime: str | None = None,
) -> str:
    """直接插入一个资源行"""
    asset_id = str(uuid.uuid4())
    path = path or f"{user_id}/uploads/{asset_id}.{'png' if kind == 'image' else 'mp4'}"
    with connect() as conn:
        conn.execute(
            "insert into public.assets (id, user_id, kind, bucket, path, mime, width, height, duration_s, fps, status)"
            " values (%s, %s, %s, 'media', %s, %s, %s, %s, %s, %s, %s)",
            (
                asset_id,
                user_id,
                kind,
                path,
                mime or ("image/png" if kind == "image" else "video/mp4"),
                width,
                height,
                duration_s,
                fps,
                status,
            ),
        )
    return asset_id


def set_balance(user_id: str, balance: int) -> None:
    """通过一条 adjustment 流水把余额调到给定值（保持 balance = sum(ledger)）"""
    with connect() as conn:
        current = conn.execute("select balance from public.credit_accounts where user_id = %s", (user_id,)).fetchone()[
            "balance"
        ]
        conn.execute(
            "select public.grant_credits(%s, %s, 'adjustment', %s)",
            (user_id, balance - current, f"test-adjust-{uuid.uuid4()}"),
        )


def task_row(task_id: str) -> dict:
    with connect() as conn:
        return conn.execute("select * from public.tasks where id = %s", (task_id,)).fetchone()


def job_state(task_id: str) -> dict:
    with connect() as conn:
        row = conn.execute("select state from public.task_job_states where task_id = %s", (task_id,)).fetchone()
        return row["state"] if row else {}


def ledger(user_id: str, task_id: str | None = None) -> list[dict]:
    with connect() as conn:
        return conn.execute(
            "select * from public.credit_ledger where user_id = %s and (%s::uuid is null or task_id = %s) order by id",
            (user_id, task_id, task_id),
        ).fetchall()


def balance(user_id: str) -> int:
    with connect() as conn:
        return conn.execute("select balance from public.credit_accounts where user_id = %s", (user_id,)).fetchone()[
            "balance"
        ]


def sql(statement: str, params=None) -> list[dict]:
    with connect() as conn:
        cur = conn.execute(statement, params)
        return cur.fetchall() if cur.description else []


def dumps(value) -> str:
    return json.dumps(value)


class RoundTrips:
    """记录 API 每次借用连接时与 Postgres 的往返次数（libpq 协议跟踪：客户端每发起一轮消息算一次）"""

    def __init__(self, monkeypatch, folder):
        from contextlib import asynccontextmanager

        from lib import db

        self.folder, self.files = folder, []
        borrow = db.connection

        @asynccontextmanager
        async def traced():
            async with borrow() as conn:
                path = self.folder / f"borrow-{len(self.files)}.trace"
                self.files.append(path)
                with open(path, "w") as trace:  # noqa: ASYNC230 (opening an empty local file)
                    conn.pgconn.trace(trace.fileno())
                    conn.pgconn.set_trace_flags(psycopg.pq.Trace.SUPPRESS_TIMESTAMPS)
                    try:
                        yield conn
                    finally:
                        conn.pgconn.untrace()

        monkeypatch.setattr(db, "connection", traced)

    def clear(self) -> None:
        self.files.clear()

    def _messages(self):
        for path in self.files:
            yield [line.split("\t") for line in path.read_text().splitlines()]

    @property
    def count(self) -> int:
        """自上次 clear 以来的往返次数"""
        turns = 0
        for messages in self._messages():
            previous = None
            for sender, *_ in messages:
                turns += sender == "F" and previous != "F"  # the client speaks again after the server answered
                previous = sender
        return turns

    @property
    def statements(self) -> list[str]:
        """自上次 clear 以来发出的语句"""
        return [
            fields[3].split('"')[3]
            for messages in self._messages()
            for fields in messages
            if fields[0] == "F" and len(fields) > 3 and fields[2] == "Parse"
        ]


@contextmanager
def storage_signings() -> Iterator[list[str]]:
    """记录本进程向存储发出的下载签名请求（每次请求记下其路径）；须在事件循环中使用"""
    from lib.storage import get_storage

    storage = get_storage()
    storage._ensure_client()
    seen: list[str] = []

    async def record(request) -> None:
        if request.method == "POST" and "/object/sign/" in request.url.path:
            seen.append(request.url.path)

    hooks = storage._http.event_hooks["request"]
    hooks.append(record)
    try:
        yield seen
    finally:
        hooks.remove(record)


def token_expiry(url: str) -> int:
    """本地存储签名 URL 的令牌里的到期时间（Unix 秒）"""
    payload = url.split("token=")[1].split(".")[0]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["e"]


def plan_as(user_id: str, statement: str, params) -> str:
    """以用户身份（RLS）执行 EXPLAIN，返回计划文本"""
    with connect() as conn, conn.transaction():
        conn.execute(
            "select set_config('role', 'authenticated', true), set_config('request.jwt.claims', %s, true)",
            (json.dumps({"sub": user_id, "role": "authenticated"}),),
        )
        return "\n".join(row["QUERY PLAN"] for row in conn.execute(f"explain {statement}", params))
