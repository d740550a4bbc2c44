"""Local auth stand-ins: the issuer's JWKS at Supabase's path, and POST /dev/users for dev tokens."""

from __future__ import annotations

import ipaddress
from uuid import UUID

from fastapi import APIRouter, Request
from pydantic import BaseModel, EmailStr

from functions.errors import Envelope, ok
from lib import db
from lib.errors import Forbidden
from lib.fields import RequestBody
from lib.local.stack import local_issuer

router = APIRouter(tags=["Local"])


class DevUserCreate(RequestBody):
    email: EmailStr


class DevUser(BaseModel):
    """本地用户及其访问令牌"""

    user_id: UUID
    access_token: str


@router.get("/auth/v1/.well-known/jwks.json", include_in_schema=False)
async def jwks():
    """本地签发者的 JWKS"""
    return local_issuer().jwks()


@router.post("/dev/users", response_model=Envelope[DevUser])
async def create_dev_user(body: DevUserCreate, request: Request):
    """创建（或找回）本地用户并签发访问令牌（只给本机：它能为任何邮箱签发令牌）"""
    if not _from_this_machine(request):
        # With SPOOL_HOST=0.0.0.0 the stack is reachable from the network: anyone there could sign in as anyone.
        raise Forbidden("Dev tokens are handed out to this machine only; run `python -m lib.local token EMAIL` here.")
    return ok(await dev_user(body.email))


async def dev_user(email: str) -> dict:
    """邮箱对应的本地用户（没有就创建）与它的访问令牌"""
    email = email.lower()
    row = await db.fetch_one(
        "with new as ("
        "  insert into auth.users (id, aud, role, email, email_confirmed_at)"
        "  values (gen_random_uuid(), 'authenticated', 'authenticated', %(email)s, now())"
        "  on conflict (email) do nothing returning id"
        ") select id from new union all select id from auth.users where email = %(email)s limit 1",
        {"email": email},
    )
    user_id = str(row["id"])
    return {"user_id": user_id, "access_token": local_issuer().mint(user_id, email)}


def _from_this_machine(request: Request) -> bool:
    """请求是否来自本机（回环地址；一个本机隧道转来的请求也是）"""
    host = request.client.host if request.client else None
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
