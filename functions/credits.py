"""Credits: balance and ledger of the caller."""

from fastapi import APIRouter, Query

from functions.auth import CurrentUserId
from functions.errors import ok
from lib.billing import get_billing_service
from lib.credits import get_credit_service

router = APIRouter(prefix="/credits", tags=["Credits"])


@router.get("")
async def get_balance(user_id: CurrentUserId):
    """当前余额"""
    return ok({"balance": await get_credit_service().get_balance(user_id=user_id)})


@router.get("/ledger")
async def list_ledger(user_id: CurrentUserId, limit: int = Query(50, ge=1, le=200), cursor: str | None = None):
    """积分流水（最新在前，游标分页）"""
    return ok(await get_credit_service().list_ledger(user_id=user_id, limit=limit, cursor=cursor))


@router.get("/packages")
async def list_packages(user_id: CurrentUserId):
    """在售的积分包"""
    return ok({"items": await get_billing_service().list_packages(user_id=user_id), "next_cursor": None})
