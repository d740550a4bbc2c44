"""Billing: credit packs, Stripe Checkout Sessions, and the webhook that grants (or claws back) credits once.

Checkout: customer (created once, saved on the profile) → Checkout Session at Stripe → a `pending` purchase row.
The row is written only after Stripe answers, so a Stripe error leaves nothing behind (the 502 says so).

Webhook: verify the signature → map the event to one SQL function → in ONE transaction insert the event id into
`stripe_events` (a duplicate conflicts there and is answered 200 without effect; a concurrent duplicate waits on
that insert until the first commits) and apply the effect. Any error rolls both back: Stripe sees a 500 and retries.
"""

from __future__ import annotations

import logging
import uuid
from functools import cache
from typing import TYPE_CHECKING

from lib import db
from lib.config import get_settings, origin_of
from lib.errors import (
    ACCOUNT_GONE,
    Conflict,
    InvalidInput,
    InvalidWebhook,
    NotFound,
    ProviderUnavailable,
    SpoolError,
    Unauthorized,
    UpstreamError,
)
from lib.fields import unstorable
from lib.stripe_client import get_stripe_client

if TYPE_CHECKING:
    import stripe

log = logging.getLogger("spool.billing")

PACKAGE_COLUMNS = "id, name, credits, price_cents, currency"
MAX_TEXT = 500  # Stripe's ids are at most 255 characters, its metadata values 500
MAX_CENTS = 10**12  # Stripe takes amounts of at most 12 digits; sums of a few such stay far inside a bigint
CHECKOUT_RECHECK_SECONDS = 5  # the success page asks Stripe about one pending checkout at most this often


def _uuid_or_none(value) -> str | None:
    try:
        return str(uuid.UUID(str(value))) if value else None
    except ValueError:
        return None


def _id_of(value) -> str | None:
    """Stripe 字段的 id（字段可能是 id 字符串或展开的对象）"""
    if isinstance(value, dict):
        value = value.get("id")
    return _typed(value, str) or None


def _typed(value, kind: type):
    """Stripe 字段按类型取值，类型不对为 None（签名正确的事件也不假定其形状；存不进数据库的、过长的文本同样）"""
    if not isinstance(value, kind) or isinstance(value, bool):
        return None
    if isinstance(value, str) and (len(value) > MAX_TEXT or unstorable(value)):
        return None
    return value


def _cents(value) -> int | None:
    value = _typed(value, int)
    return value if value is not None and 0 <= value < MAX_CENTS else None


def _currency(value) -> str | None:
    """Stripe 的币种（三个字母的 ISO 代码，小写）；不像币种为 None"""
    value = _typed(value, str)
    return value.lower() if value and len(value) == 3 and value.isascii() and value.isalpha() else None


DISPUTE_EVENTS = ("charge.dispute.funds_withdrawn", "charge.dispute.funds_reinstated")


def event_effect(event: dict, *, disputed_purchase_id: str | None = None) -> tuple[str, tuple] | None:
    """把 Stripe 事件映射为一次 SQL 调用（不处理的事件为 None；争议可带上其 PaymentIntent 的 metadata 指明的购买）"""
    kind, obj = event["type"], event["data"]["object"]
    meta = _typed(obj.get("metadata"), dict) or {}
    purchase_id = _uuid_or_none(meta.get("purchase_id"))
    package_id = _typed(meta.get("package_id"), str)
    if kind.startswith("checkout.session.") and _typed(obj.get("id"), str):
        user_id = _uuid_or_none(meta.get("user_id") or obj.get("client_reference_id"))
        ids = (purchase_id, obj["id"], _id_of(obj.get("payment_intent")), user_id, package_id)
        # no_payment_required: a 100 % discount or a Price of 0; nothing is owed, so the pack is the buyer's.
        paid = kind == "checkout.session.async_payment_succeeded" or (
            kind == "checkout.session.completed" and obj.get("payment_status") in ("paid", "no_payment_required")
        )
        if paid:
            # What the PaymentIntent charged: its refunds and disputes count in that amount and currency. With
            # Adaptive Pricing that is the buyer's currency, while amount_total stays in the integration's. Each
            # amount is recorded with its own currency.
            presented = _typed(obj.get("presentment_details"), dict) or {}
            amount, currency = (
                _cents(presented.get("presentment_amount")),
                _currency(presented.get("presentment_currency")),
            )
            if not amount or currency is None:
                amount, currency = _cents(obj.get("amount_total")), _currency(obj.get("currency"))
            return "select public.apply_checkout_paid(%s, %s, %s, %s, %s, %s, %s) as r", (*ids, amount, currency)
        unpaid = {
            "checkout.session.completed": "pending",
            "checkout.session.async_payment_failed": "failed",
            "checkout.session.expired": "expired",
        }.get(kind)
        if unpaid:
            return "select public.apply_checkout_unpaid(%s, %s, %s, %s, %s, %s) as r", (*ids, unpaid)
        return None
    if kind in DISPUTE_EVENTS and _typed(obj.get("id"), str):
        # A chargeback: no charge.refunded comes, the money is withdrawn (and given back if the dispute is won).
        return (
            "select public.apply_charge_dispute(%s, %s, %s, %s, %s) as r",
            (
                _id_of(obj.get("payment_intent")),
                obj["id"],
                _cents(obj.get("amount")),
                kind.endswith("withdrawn"),
                disputed_purchase_id,
            ),
        )
    if kind == "charge.refunded":
        user_id = _uuid_or_none(meta.get("user_id"))
        return (
            "select public.apply_charge_refunded(%s, %s, %s, %s, %s, %s, %s) as r",
            (
                purchase_id,
                _id_of(obj.get("payment_intent")),
                user_id,
                package_id,
                _cents(obj.get("amount")),
                _cents(obj.get("amount_refunded")) or 0,
                _currency(obj.get("currency")),
            ),
        )
    return None


def _warn_on_a_price_mismatch(session: dict, price: dict | None) -> None:
    """付款与结账时购买记下的价格（同一币种）不符时记一条警告（折扣，或 stripe_price_id 指向了别的价格）：积分照发"""
    # amount_total is in the session's currency, which Adaptive Pricing leaves as the integration's; a payment in
    # another currency (per-currency prices) has no amount in the recorded one to compare with.
    paid, currency = _cents(session.get("amount_total")), _currency(session.get("currency"))
    if not price or paid is None or currency != price.get("currency") or paid == price.get("amount_cents"):
        return
    log.warning(
        "stripe session %s paid %s %s for pack %s, priced %s %s at checkout: check the pack's stripe_price_id",
        session.get("id"),
        paid,
        currency,
        _typed((_typed(session.get("metadata"), dict) or {}).get("package_id"), str),
        price.get("amount_cents"),
        price.get("currency"),
    )


async def _user_departed(conn, event: dict) -> bool:
    """事件的元数据指向的用户是否已被删除"""
    obj = event["data"]["object"]
    meta = _typed(obj.get("metadata"), dict) or {}
    user_id = _uuid_or_none(meta.get("user_id") or obj.get("client_reference_id"))
    if user_id is None:
        return False
    cur = await conn.execute("select not exists (select 1 from auth.users where id = %s) as gone", (user_id,))
    return (await cur.fetchone())["gone"]


def _key_livemode(key: str | None) -> bool | None:
    """API 密钥的模式：live → True，test → False，看不出 → None"""
    if key and key.startswith(("sk_live_", "rk_live_")):
        return True
    if key and key.startswith(("sk_test_", "rk_test_")):
        return False
    return None


def _of_another_mode(event: dict) -> bool:
    """事件与 STRIPE_SECRET_KEY 不是同一模式（测试 / 线上）"""
    mode = _key_livemode(get_settings().stripe_secret_key)
    livemode = event.get("livemode")
    return mode is not None and isinstance(livemode, bool) and livemode != mode


def upstream_error(exc: stripe.StripeError) -> SpoolError:
    """把 Stripe 错误变成清楚的领域错误（502；幂等键冲突为 409）"""
    import stripe

    if isinstance(exc, stripe.IdempotencyError):
        return Conflict("This Idempotency-Key was already used for a different checkout.")
    if isinstance(exc, stripe.APIConnectionError):
        return UpstreamError("Could not reach Stripe to start the checkout. Nothing was charged; try again.")
    if isinstance(exc, stripe.CardError):
        return UpstreamError(f"Stripe declined the payment: {exc.user_message or exc.code}. Nothing was charged.")
    detail = exc.code or type(exc).__name__
    return UpstreamError(f"Stripe could not start the checkout ({detail}). Nothing was charged; try again.")


class BillingService:
    """计费服务（积分包、Stripe 结账与 webhook）"""

    async def list_packages(self, *, user_id: str) -> list[dict]:
        """列出在售的积分包（以用户身份读：RLS 只给登录用户看在售的包）"""
        return await db.fetch_all_as(
            user_id, f"select {PACKAGE_COLUMNS} from public.credit_packages where active order by price_cents, id"
        )

    async def create_checkout(
        self,
        *,
        user_id: str,
        package_id: str,
        success_url: str | None = None,
        cancel_url: str | None = None,
        idempotency_key: str | None = None,
    ) -> dict:
        """创建 Stripe Checkout Session 并记录待支付的购买"""
        import stripe

        settings = get_settings()
        success_url = self._allowed_url(success_url or settings.billing_success_url, "success_url")
        cancel_url = self._allowed_url(cancel_url or settings.billing_cancel_url, "cancel_url")
        package = await db.fetch_one(
            f"select {PACKAGE_COLUMNS}, stripe_price_id from public.credit_packages where id = %s and active",
            (package_id,),
        )
        if package is None:
            raise NotFound(f"No credit pack '{package_id}'.")
        # A replayed Idempotency-Key maps to the same purchase id, so Stripe returns the same session.
        purchase_id = str(
            uuid.uuid5(uuid.NAMESPACE_URL, f"spool:checkout:{user_id}:{idempotency_key}")
            if idempotency_key
            else uuid.uuid4()
        )
        earlier = idempotency_key and await db.fetch_one(  # only a replayed key can name an earlier purchase
            "select package_id, checkout_session_id, status from public.purchases where id = %s", (purchase_id,)
        )
        if earlier and earlier["package_id"] != package["id"]:
            raise Conflict("This Idempotency-Key was already used for a different request.")
        metadata = {"user_id": user_id, "package_id": package["id"], "purchase_id": purchase_id}
        params = {
            "mode": "payment",
            "line_items": [self._line_item(package)],
            "client_reference_id": user_id,
            "success_url": success_url,
            "cancel_url": cancel_url,
            "metadata": metadata,
            "payment_intent_data": {"metadata": metadata},
        }
        try:
            if earlier and earlier["status"] == "pending" and earlier["checkout_session_id"]:
                # The checkout this key started, while still open, whatever changed since (the pack's price, the
                # redirect URLs): Stripe refuses a key reused with other parameters, and forgets it after a day.
                ongoing = await self._open_session(earlier["checkout_session_id"])
                if ongoing is not None:
                    return {"checkout_url": ongoing.url, "session_id": ongoing.id}
            customer_id = await self._customer_for(user_id=user_id)
            try:
                session = await self._create_session(params, purchase_id, customer_id)
            except stripe.InvalidRequestError as exc:
                if exc.code != "resource_missing" or exc.param != "customer":
                    raise
                # The saved customer is gone at Stripe: deleted in the Dashboard, or saved under test keys
                # before the live ones. A new one replaces it; otherwise this user could never buy again.
                log.warning("stripe customer %s of user %s no longer exists; creating a new one", customer_id, user_id)
                customer_id = await self._customer_for(user_id=user_id, replacing=customer_id)
                session = await self._create_session(params, purchase_id, customer_id)
        except stripe.StripeError as exc:
            log.warning("stripe checkout failed for user %s: %s (%s)", user_id, type(exc).__name__, exc)
            if earlier and isinstance(exc, stripe.IdempotencyError):  # the same pack, asked for with other parameters
                raise Conflict("This Idempotency-Key's checkout has ended; start a new one with a new key.") from None
            raise upstream_error(exc) from None
        if earlier and earlier["checkout_session_id"] != session.id:
            # Stripe replays a key's answer (the same session, open, paid or expired) for at least 24 hours; past
            # that it creates a new session, which must not be paid on the old purchase row: none is handed out.
            raise Conflict("This Idempotency-Key's checkout has ended; start a new one with a new key.")
        await db.execute(
            "insert into public.purchases (id, user_id, package_id, checkout_session_id, credits, amount_cents,"
            " currency) values (%s, %s, %s, %s, %s, %s, %s) on conflict do nothing",
            (
                purchase_id,
                user_id,
                package["id"],
                session.id,
                package["credits"],
                package["price_cents"],
                package["currency"],
            ),
        )
        return {"checkout_url": session.url, "session_id": session.id}

    async def checkout_status(self, *, user_id: str, session_id: str) -> dict:
        """结账的状态（成功页用）：仍待支付时向 Stripe 问一次，已付则当场发放积分（与 webhook 同一条 SQL，只发一次）"""
        purchase = await self._purchase(user_id, session_id)
        if purchase["status"] == "pending" and await self._may_ask_stripe(purchase["id"]):
            session = await self._session_if_reachable(session_id)
            kind = {"complete": "checkout.session.completed", "expired": "checkout.session.expired"}.get(
                session.get("status") if session else None
            )
            effect = event_effect({"type": kind, "data": {"object": session}}) if kind else None
            if effect is not None:
                async with db.transaction() as conn:
                    row = await (await conn.execute(*effect)).fetchone()
                log.info("checkout %s settled from the success page: %s", session_id, row["r"].get("result"))
                if row["r"].get("result") == "granted":  # its webhook will find it already granted
                    _warn_on_a_price_mismatch(session, row["r"].get("price"))
                purchase = await self._purchase(user_id, session_id)
        return {
            "session_id": session_id,
            "purchase_id": str(purchase["id"]),
            "package_id": purchase["package_id"],
            "credits": purchase["credits"],
            "status": purchase["status"],
        }

    async def _purchase(self, user_id: str, session_id: str) -> dict:
        """这个用户以该会话发起的购买；没有 → NotFound（账户已删除 → 401）"""
        purchase = await db.fetch_one_as(
            user_id,
            "select id, package_id, credits, status from public.purchases"
            " where checkout_session_id = %s and user_id = %s",
            (session_id, user_id),
        )
        if purchase is None:
            raise NotFound("No checkout with this id.")
        return purchase

    async def _may_ask_stripe(self, purchase_id) -> bool:
        """这次可否向 Stripe 问这个待支付的结账（每个至多每 CHECKOUT_RECHECK_SECONDS 秒一次）"""
        # A polling page, or a loop, would otherwise spend the Stripe rate limit that every checkout shares.
        row = await db.fetch_one(
            "update public.purchases set stripe_checked_at = now() where id = %s and status = 'pending'"
            " and (stripe_checked_at is null or stripe_checked_at < now() - make_interval(secs => %s)) returning id",
            (purchase_id, CHECKOUT_RECHECK_SECONDS),
        )
        return row is not None

    async def _session_if_reachable(self, session_id: str) -> dict | None:
        """从 Stripe 取会话；Stripe 不可达或出错 → None（只按我们的记录回答，webhook 照样会来）"""
        import stripe

        try:
            session = await get_stripe_client().v1.checkout.sessions.retrieve_async(session_id)
        except (stripe.StripeError, ProviderUnavailable) as exc:
            log.warning("could not ask Stripe about checkout %s: %s", session_id, exc)
            return None
        return session.to_dict()

    async def handle_webhook(self, *, payload: bytes, signature: str | None) -> dict:
        """校验并处理一个 Stripe webhook 事件（每个事件 id 只生效一次）"""
        event = self._verify(payload, signature)
        if _of_another_mode(event):
            # A test payment is no money: it must not grant credits where the key is live (nor the other way).
            # Signed correctly all the same when STRIPE_WEBHOOK_SECRET belongs to the other mode's endpoint.
            log.warning(
                "stripe event %s (%s) is a %s-mode event, and STRIPE_SECRET_KEY is not: check STRIPE_WEBHOOK_SECRET",
                event["id"],
                event["type"],
                "live" if event["livemode"] else "test",
            )
            return {"event_id": event["id"], "result": "wrong_mode"}
        disputed_purchase_id = await self._purchase_of_an_unknown_payment(event)
        effect = event_effect(event, disputed_purchase_id=disputed_purchase_id)
        async with db.transaction() as conn:
            cur = await conn.execute(
                "insert into public.stripe_events (id, type, processed_at) values (%s, %s, now())"
                " on conflict (id) do nothing returning id",
                (event["id"], event["type"]),
            )
            if await cur.fetchone() is None:
                log.info("stripe event %s (%s) already processed", event["id"], event["type"])
                return {"event_id": event["id"], "result": "duplicate"}
            result = {"result": "ignored"}
            if effect is not None:
                row = await (await conn.execute(*effect)).fetchone()
                result = row["r"]
            price = result.pop("price", None)
            if result["result"] == "granted":
                _warn_on_a_price_mismatch(event["data"]["object"], price)
            if result["result"] == "ignored" and event["type"].startswith("charge.dispute."):
                # Money disputed for something not found here (an account deleted since): worth a look.
                obj = event["data"]["object"]
                log.warning(
                    "stripe dispute %s on payment %s matches no purchase", obj.get("id"), obj.get("payment_intent")
                )
            elif result["result"] == "ignored" and await _user_departed(conn, event):
                # Nothing to grant to, nor take from, and a 500 would be retried for days: answered, and logged
                # so that a payment for a deleted account can be refunded by hand.
                obj = event["data"]["object"]
                log.warning(
                    "stripe event %s (%s) is about a deleted user: session %s, payment %s; refund it by hand if paid",
                    event["id"],
                    event["type"],
                    obj.get("id") if event["type"].startswith("checkout.session.") else None,
                    _id_of(obj.get("payment_intent")),
                )
                result = {"result": "orphaned"}
        log.info("stripe event %s (%s): %s", event["id"], event["type"], result.get("result"))
        return {"event_id": event["id"], **result}

    async def _purchase_of_an_unknown_payment(self, event: dict) -> str | None:
        """争议的付款还没记在任何购买上时：Stripe 上该 PaymentIntent 的 metadata 指明的购买 id"""
        import stripe

        if event["type"] not in DISPUTE_EVENTS:
            return None
        payment_intent = _id_of(event["data"]["object"].get("payment_intent"))
        if payment_intent is None or await db.fetch_one(
            "select 1 from public.purchases where payment_intent_id = %s", (payment_intent,)
        ):
            return None  # the usual case: the payment was recorded long before its chargeback
        # Its checkout's events may still be on their way (retried, or resent in any order): a dispute names only
        # the PaymentIntent, whose metadata names the purchase. Stripe out of reach: a 500, and Stripe retries.
        try:
            intent = await get_stripe_client().v1.payment_intents.retrieve_async(payment_intent)
        except stripe.InvalidRequestError as exc:
            if exc.code != "resource_missing":
                raise
            return None
        return _uuid_or_none((_typed(intent.to_dict().get("metadata"), dict) or {}).get("purchase_id"))

    def _verify(self, payload: bytes, signature: str | None) -> dict:
        import stripe

        settings = get_settings()
        if not settings.stripe_webhook_configured:  # unset, or a stand-in anyone could sign with
            raise ProviderUnavailable(
                "Stripe webhooks are not configured: STRIPE_WEBHOOK_SECRET is not set to the endpoint's signing secret."
            )
        if signature is not None and not signature.isascii():  # Stripe's comparison raises TypeError on it
            raise InvalidWebhook("The Stripe signature is not valid: it holds characters that are not ASCII.")
        try:
            event = (
                get_stripe_client()
                .construct_event(
                    payload, signature, settings.stripe_webhook_secret, tolerance=settings.stripe_webhook_tolerance
                )
                .to_dict()
            )
        except stripe.SignatureVerificationError as exc:
            # Otherwise a wrong secret shows only as 400s in the access log while Stripe retries every event.
            log.warning(
                "stripe webhook refused: %s; if every event is, STRIPE_WEBHOOK_SECRET is not this endpoint's secret",
                exc.user_message or exc,
            )
            raise InvalidWebhook(f"The Stripe signature is not valid: {exc.user_message or exc}") from None
        except (ValueError, TypeError, AttributeError):  # not UTF-8, not JSON, not an object
            raise InvalidWebhook("The webhook body is not a Stripe event.") from None
        data = event.get("data")
        if (
            not _typed(event.get("id"), str)
            or not _typed(event.get("type"), str)
            or not isinstance(data, dict)
            or not isinstance(data.get("object"), dict)
        ):
            raise InvalidWebhook("The webhook body is not a Stripe event.")
        return event

    async def _open_session(self, session_id: str):
        """Stripe 上仍可付款的会话；已结束或 Stripe 不认识 → None"""
        import stripe

        try:
            session = await get_stripe_client().v1.checkout.sessions.retrieve_async(session_id)
        except stripe.InvalidRequestError as exc:
            if exc.code != "resource_missing":
                raise
            return None
        return session if session.status == "open" and session.url else None

    async def _create_session(self, params: dict, purchase_id: str, customer_id: str):
        """创建 Checkout Session（幂等键含客户：Stripe 也记住失败的回答，换了客户的重试需要新键）"""
        return await get_stripe_client().v1.checkout.sessions.create_async(
            {**params, "customer": customer_id}, options={"idempotency_key": f"checkout-{purchase_id}-{customer_id}"}
        )

    def _allowed_url(self, url: str, field: str) -> str:
        allowed = {origin_of(o) for o in get_settings().billing_allowed_origins}
        if origin_of(url) not in allowed - {None}:
            raise InvalidInput(
                f"{field} must be on an allowed origin.",
                details=[{"field": field, "message": "origin not allowed: " + ", ".join(sorted(allowed - {None}))}],
            )
        return url

    def _line_item(self, package: dict) -> dict:
        if package["stripe_price_id"]:
            return {"price": package["stripe_price_id"], "quantity": 1}
        return {
            "price_data": {
                "currency": package["currency"],
                "unit_amount": package["price_cents"],
                "product_data": {"name": package["name"]},
            },
            "quantity": 1,
        }

    async def _customer_for(self, *, user_id: str, replacing: str | None = None) -> str:
        """用户的 Stripe 客户 id（首次结账时创建并保存到资料；replacing：Stripe 已不认的旧 id，换新的）"""
        profile = await db.fetch_one("select email, stripe_customer_id from public.profiles where id = %s", (user_id,))
        if profile is None:  # every user has one from sign-up until deletion
            raise Unauthorized(ACCOUNT_GONE)
        if profile["stripe_customer_id"] and profile["stripe_customer_id"] != replacing:
            return profile["stripe_customer_id"]
        params = {"metadata": {"user_id": user_id}}
        if profile["email"]:
            params["email"] = profile["email"]
        # Same key for concurrent first checkouts: Stripe answers both with one customer. A replacement has its
        # own key: the first one's would replay the customer that is gone.
        key = f"customer-{user_id}" + (f"-after-{replacing}" if replacing else "")
        customer = await get_stripe_client().v1.customers.create_async(params, options={"idempotency_key": key})
        row = await db.fetch_one(
            "update public.profiles set stripe_customer_id = case when stripe_customer_id is null"
            " or stripe_customer_id = %s then %s else stripe_customer_id end where id = %s"
            " returning stripe_customer_id",
            (replacing, customer.id, user_id),
        )
        return row["stripe_customer_id"]


@cache
def get_billing_service() -> BillingService:
    """获取计费服务单例"""
    return BillingService()
