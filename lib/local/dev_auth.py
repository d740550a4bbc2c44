"""Local auth stand-ins: the issuer's JWKS at Supabase's path, and POST /dev/users for dev tokens."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, EmailStr

from functions.errors import ok
from lib import db
from lib.local.stack import local_issuer

router = APIRouter(tags=["Local"])


class DevUserCreate(BaseModel):
    email: EmailStr


@router.get("/auth/v1/.well-known/jwks.json", include_in_schema=False)
async def jwks():
    """本地签发者的 JWKS"""
    return local_issuer().jwks()


@router.post("/dev/users")
async def create_dev_user(body: DevUserCreate):
    """创建（或找回）本地用户并签发访问令牌"""
    email = body.email.lower()
    row = await db.fetch_one(
        "with new as ("
        "  insert into auth.users (id, aud, role, email, email_confirmed_at)"
        "  values (gen_random_uuid(), 'authenticated', 'authenticated', %(email)s, now())"
        "  on conflict (email) do nothing returning id"
        ") select id from new union all select id from auth.users where email = %(email)s limit 1",
        {"email": email},
    )
    user_id = str(row["id"])
    return ok({"user_id": user_id, "access_token": local_issuer().mint(user_id, email)})
