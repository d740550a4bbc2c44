"""Credits: balance and ledger of the caller."""

from datetime import datetime
from uuid import UUID

from fastapi import APIRouter
from pydantic import BaseModel

from functions.auth import CurrentUserId
from functions.errors import ANSWER, Envelope, ok
from functions.query import page_size
from lib.billing import get_billing_service
from lib.credits import get_credit_service

router = APIRouter(prefix="/credits", tags=["Credits"])


class Balance(BaseModel):
    balance: int


class LedgerEntry(BaseModel):
    id: int
    delta: int
    kind: str
    task_id: UUID | None
    ref: str | None
    balance_after: int
    created_at: datetime


class LedgerPage(BaseModel):
    items: list[LedgerEntry]
    next_cursor: str | None


class CreditPackage(BaseModel):
    id: str
    name: str
    credits: int
    price_cents: int
    currency: str


class PackageList(BaseModel):
    model_config = ANSWER

    items: list[CreditPackage]
    next_cursor: None = None


@router.get("", response_model=Envelope[Balance])
async def get_balance(user_id: CurrentUserId):
    """当前余额"""
    return ok({"balance": await get_credit_service().get_balance(user_id=user_id)})


@router.get("/ledger", response_model=Envelope[LedgerPage])
async def list_ledger(user_id: CurrentUserId, limit: page_size(200) = 50, cursor: str | None = None):
    """积分流水（最新在前，游标分页）"""
    return ok(await get_credit_service().list_ledger(user_id=user_id, limit=limit, cursor=cursor))


@router.get("/packages", response_model=Envelope[PackageList])
async def list_packages(user_id: CurrentUserId):
    """在售的积分包"""
    return ok({"items": await get_billing_service().list_packages(user_id=user_id), "next_cursor": None})
