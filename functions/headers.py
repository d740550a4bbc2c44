"""Request headers several routes share."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request

from lib.errors import InvalidInput


def _idempotency_key(
    request: Request,
    # Any text without control characters (a NUL cannot be stored), at most 200 characters.
    key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            min_length=1,
            max_length=200,
            pattern=r"^[^\x00-\x1f\x7f]+$",
            description="Makes a retried request return the first one's result instead of doing it again.",
        ),
    ] = None,
) -> str | None:
    """幂等键只能给一次（两个不同的键不会悄悄只用第一个）→ 422"""
    if len(request.headers.getlist("idempotency-key")) > 1:
        raise InvalidInput(
            "The request is not valid.",
            details=[{"field": "header.Idempotency-Key", "message": "given more than once"}],
        )
    return key


IdempotencyKey = Annotated[str | None, Depends(_idempotency_key)]
