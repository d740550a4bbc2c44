"""Small factories that build rows straight in the database (as the table owner)."""

from __future__ import annotations

import json
import uuid

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
