"""Billing: Stripe Checkout for credit packs, and the Stripe webhook."""

from __future__ import annotations

from fastapi import APIRouter, Header, Request
from pydantic import BaseModel, Field

from functions.auth import CurrentUserId
from functions.errors import Envelope, ok
from functions.headers import IdempotencyKey
from lib.billing import get_billing_service
from lib.fields import RequestBody, Text, text_up_to

router = APIRouter(prefix="/billing", tags=["Billing"])


class CheckoutCreate(RequestBody):
    package_id: Text = Field(min_length=1, max_length=100, examples=["starter"])
    success_url: text_up_to(2048) | None = Field(
        None, examples=["http://localhost:3000/billing/success?session_id={CHECKOUT_SESSION_ID}"]
    )
    cancel_url: text_up_to(2048) | None = Field(None, examples=["http://localhost:3000/billing/cancel"])


class CheckoutPublic(BaseModel):
    checkout_url: str
    session_id: str


@router.post("/checkout", response_model=Envelope[CheckoutPublic])
async def create_checkout(
    body: CheckoutCreate,
    user_id: CurrentUserId,
    idempotency_key: IdempotencyKey = None,
):
    """创建 Stripe 结账会话（同一 Idempotency-Key 重放返回同一会话）"""
    checkout = await get_billing_service().create_checkout(
        user_id=user_id,
        package_id=body.package_id,
        success_url=body.success_url,
        cancel_url=body.cancel_url,
        idempotency_key=idempotency_key,
    )
    return ok(CheckoutPublic(**checkout).model_dump())


class CheckoutStatus(BaseModel):
    session_id: str
    purchase_id: str
    package_id: str
    credits: int
    status: str = Field(description="pending, paid, failed, expired, refunded, partially_refunded or disputed")


@router.get("/checkout/{session_id}", response_model=Envelope[CheckoutStatus])
async def checkout_status(session_id: text_up_to(255), user_id: CurrentUserId):
    """结账的状态（成功页：已付但 webhook 还没到时当场发放积分）"""
    return ok(await get_billing_service().checkout_status(user_id=user_id, session_id=session_id))


@router.post("/webhook", include_in_schema=False)
async def stripe_webhook(request: Request, stripe_signature: str | None = Header(None, alias="Stripe-Signature")):
    """Stripe webhook（校验签名；每个事件只处理一次）"""
    result = await get_billing_service().handle_webhook(payload=await request.body(), signature=stripe_signature)
    return ok(result)
