"""Health: is the database answering."""

from __future__ import annotations

import asyncio

from lib import db


async def check_database(seconds: float = 3.0) -> bool:
    """数据库是否可用"""
    try:
        row = await asyncio.wait_for(db.fetch_one("select 1 as ok"), seconds)
        return bool(row and row["ok"] == 1)
    except Exception:
        return False
