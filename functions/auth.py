"""The authentication dependency every signed-in route uses."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from lib.auth import get_token_verifier
from lib.errors import Unauthorized

# Declares the scheme in the OpenAPI schema (the Authorize button of /docs); the checks and the 401 are ours.
bearer = HTTPBearer(auto_error=False, description="The Supabase session's access token.")


async def get_current_claims(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> dict:
    """校验 Bearer 令牌并返回 claims"""
    token = credentials.credentials.strip() if credentials else ""
    if not token:
        raise Unauthorized("Sign in: send 'Authorization: Bearer <access token>'.")
    claims = await get_token_verifier().averify(token)
    request.state.claims = claims
    return claims


async def get_current_user_id(claims: Annotated[dict, Depends(get_current_claims)]) -> str:
    """当前用户的 id（令牌的 sub）"""
    return claims["sub"]


CurrentUserId = Annotated[str, Depends(get_current_user_id)]
