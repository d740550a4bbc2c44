"""Cursor paging: opaque cursors, newest first by (created_at, id)."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import datetime

from lib.errors import InvalidInput

BAD_CURSOR = "The cursor is not valid."
CURSOR_DETAILS = [{"field": "query.cursor", "message": "pass back the next_cursor of the previous page, unchanged"}]


def encode_cursor(value: dict) -> str:
    """编码分页游标"""
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> dict | None:
    """解析分页游标；无效 → 422"""
    if not cursor:
        return None
    try:
        value = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser goes
        value = None
    if not isinstance(value, dict):
        raise InvalidInput(BAD_CURSOR, details=CURSOR_DETAILS)
    return value


def page_after(cursor: str | None) -> dict:
    """解析 (created_at, id) 游标；无效 → 422"""
    after = decode_cursor(cursor)
    if after is None:
        return {"at": None, "id": None}
    try:
        return {"at": datetime.fromisoformat(after["created_at"]), "id": str(uuid.UUID(after["id"]))}
    except (KeyError, TypeError, ValueError, AttributeError):
        raise InvalidInput(BAD_CURSOR, details=CURSOR_DETAILS) from None


def id_after(cursor: str | None) -> int | None:
    """解析 bigint id 游标（账本）；无效 → 422"""
    after = decode_cursor(cursor)
    if after is None:
        return None
    value = after.get("id")
    if type(value) is not int or not 0 < value < 2**63:  # a bool is not an id
        raise InvalidInput(BAD_CURSOR, details=CURSOR_DETAILS)
    return value


def page_of(rows: list[dict], limit: int) -> dict:
    """取一页（多查一行判断是否还有下一页）"""
    next_cursor = None
    if len(rows) > limit:
        last = rows[limit - 1]
        next_cursor = encode_cursor({"created_at": last["created_at"].isoformat(), "id": str(last["id"])})
    return {"items": rows[:limit], "next_cursor": next_cursor}
