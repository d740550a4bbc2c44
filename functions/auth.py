"""The authentication dependency every signed-in route uses."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from lib.auth import get_token_verifier
from lib.errors import Unauthorized


async def get_current_claims(request: Request) -> dict:
    """校验 Bearer 令牌并返回 claims"""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("Sign in: send 'Authorization: Bearer <access token>'.")
    claims = await get_token_verifier().averify(token.strip())
    request.state.claims = claims
    return claims


async def get_current_user_id(claims: Annotated[dict, Depends(get_current_claims)]) -> str:
    """当前用户的 id（令牌的 sub）"""
    return claims["sub"]


CurrentUserId = Annotated[str, Depends(get_current_user_id)]
