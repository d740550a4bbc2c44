"""Billing: credit packs, Stripe Checkout against a local fake Stripe, and webhooks signed as Stripe signs them."""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid

import pytest

from lib.config import get_settings
from lib.stripe_client import reset_stripe_client
from tests import fake_stripe
from tests.factories import balance, connect, ledger, set_balance, sql

SECRET = "whsec_test_local"  # conftest's STRIPE_WEBHOOK_SECRET
SESSIONS = "/v1/checkout/sessions"
CUSTOMERS = "/v1/customers"


@pytest.fixture
def stripe_api():
    """本地假 Stripe：STRIPE_API_BASE 指向它，结束后恢复"""
    fake = fake_stripe.FakeStripe().start()
    previous = os.environ.get("STRIPE_API_BASE")
    os.environ["STRIPE_API_BASE"] = fake.base_url
    get_settings.cache_clear()
    reset_stripe_client()
    yield fake
    fake.stop()
    if previous is None:
        os.environ.pop("STRIPE_API_BASE", None)
    else:
        os.environ["STRIPE_API_BASE"] = previous
    get_settings.cache_clear()
    reset_stripe_client()


async def post_event(
    client,
    evt: dict | str,
    *,
    secret: str = SECRET,
    timestamp: int | None = None,
    signature: str | None = None,
    headers: dict | None = None,
):
    payload = evt if isinstance(evt, str) else json.dumps(evt)
    sig = signature if signature is not None else fake_stripe.sign(payload, secret, timestamp)
    hdrs = {"Stripe-Signature": sig, "Content-Type": "application/json"} if headers is None else headers
    return await client.post("/billing/webhook", content=payload, headers=hdrs)


async def checkout(client, user, package_id: str = "starter", **body) -> dict:
    """经假 Stripe 创建结账，返回 {session_id, metadata}"""
    resp = await client.post("/billing/checkout", json={"package_id": package_id, **body}, headers=user.headers)
    assert resp.status_code == 200, resp.text
    return resp.json()["data"]


def metadata_for(user, package_id: str = "starter") -> dict:
    return {"user_id": user.id, "package_id": package_id, "purchase_id": str(uuid.uuid4())}


async def bought(client, user, session_id: str, payment_intent: str) -> dict:
    """一个已付款的 starter 包（checkout.session.completed），返回其 metadata"""
    metadata = metadata_for(user)
    paid = fake_stripe.session(session_id, metadata, payment_intent=payment_intent)
    await post_event(client, fake_stripe.event("checkout.session.completed", paid))
    return metadata


def purchases(user_id: str) -> list[dict]:
    with connect() as conn:
        return conn.execute(
            "select * from public.purchases where user_id = %s order by created_at", (user_id,)
        ).fetchall()


def stripe_event_count() -> int:
    with connect() as conn:
        return conn.execute("select count(*) as n from public.stripe_events").fetchone()["n"]


def kinds(user_id: str) -> list[tuple[str, int]]:
    return [(row["kind"], row["delta"]) for row in ledger(user_id)]


# --- packs ----------------------------------------------------------------------------------------------------


async def test_packages_lists_active_packs(client, make_user):
    user = await make_user()
    with connect() as conn:
        conn.execute("update public.credit_packages set active = false where id = 'studio'")
    try:
        resp = await client.get("/credits/packages", headers=user.headers)
    finally:
        with connect() as conn:
            conn.execute("update public.credit_packages set active = true where id = 'studio'")
    assert resp.status_code == 200
    items = resp.json()["data"]["items"]
    assert [p["id"] for p in items] == ["starter", "creator"] and resp.json()["data"]["next_cursor"] is None
    assert items[0] == {
        "id": "starter",
        "name": "Starter — 500 credits",
        "credits": 500,
        "price_cents": 500,
        "currency": "usd",
    }


async def test_packages_need_sign_in(client):
    assert (await client.get("/credits/packages")).status_code == 401


# --- checkout -------------------------------------------------------------------------------------------------


async def test_checkout_sends_price_mode_metadata_key_and_customer(client, make_user, stripe_api):
    user = await make_user()
    data = await checkout(client, user, "creator")

    (customer_req,) = stripe_api.posts(CUSTOMERS)
    assert customer_req.form == {"email": user.email, "metadata[user_id]": user.id}
    assert customer_req.headers["idempotency-key"] == f"customer-{user.id}"
    assert customer_req.headers["authorization"] == "Bearer sk_test_local"

    (req,) = stripe_api.posts(SESSIONS)
    form = req.form
    purchase_id = form["metadata[purchase_id]"]
    assert form["mode"] == "payment"
    assert form["customer"] == "cus_fake1"
    assert form["client_reference_id"] == user.id
    assert form["line_items[0][quantity]"] == "1"
    assert form["line_items[0][price_data][unit_amount]"] == "2000"
    assert form["line_items[0][price_data][currency]"] == "usd"
    assert form["line_items[0][price_data][product_data][name]"] == "Creator — 2,200 credits"
    for prefix in ("metadata", "payment_intent_data[metadata]"):
        assert form[f"{prefix}[user_id]"] == user.id
        assert form[f"{prefix}[package_id]"] == "creator"
        assert form[f"{prefix}[purchase_id]"] == purchase_id
    assert form["success_url"] == "http://localhost:3000/billing/success?session_id={CHECKOUT_SESSION_ID}"
    assert form["cancel_url"] == "http://localhost:3000/billing/cancel"
    assert req.headers["idempotency-key"] == f"checkout-{purchase_id}-cus_fake1"

    assert data == {
        "checkout_url": f"https://checkout.stripe.com/c/pay/{data['session_id']}",
        "session_id": data["session_id"],
    }
    (row,) = purchases(user.id)
    assert (str(row["id"]), row["checkout_session_id"], row["status"], row["credits"], row["amount_cents"]) == (
        purchase_id,
        data["session_id"],
        "pending",
        2200,
        2000,
    )
    assert balance(user.id) == 100  # nothing granted before the webhook


async def test_customer_is_saved_and_reused(client, make_user, stripe_api):
    user = await make_user()
    await checkout(client, user)
    await checkout(client, user, "studio")
    assert len(stripe_api.posts(CUSTOMERS)) == 1
    assert [r.form["customer"] for r in stripe_api.posts(SESSIONS)] == ["cus_fake1", "cus_fake1"]
    with connect() as conn:
        profile = conn.execute("select stripe_customer_id from public.profiles where id = %s", (user.id,)).fetchone()
    assert profile["stripe_customer_id"] == "cus_fake1"


async def test_checkout_uses_the_stripe_price_when_the_pack_has_one(client, make_user, stripe_api):
    user = await make_user()
    with connect() as conn:
        conn.execute("update public.credit_packages set stripe_price_id = 'price_123' where id = 'starter'")
    try:
        await checkout(client, user)
    finally:
        with connect() as conn:
            conn.execute("update public.credit_packages set stripe_price_id = null where id = 'starter'")
    form = stripe_api.posts(SESSIONS)[0].form
    assert form["line_items[0][price]"] == "price_123"
    assert not any(k.startswith("line_items[0][price_data]") for k in form)


async def test_checkout_replay_with_same_idempotency_key_returns_same_session(client, make_user, stripe_api):
    user = await make_user()
    headers = {**user.headers, "Idempotency-Key": "buy-1"}
    first = await client.post("/billing/checkout", json={"package_id": "starter"}, headers=headers)
    again = await client.post("/billing/checkout", json={"package_id": "starter"}, headers=headers)
    assert first.json()["data"] == again.json()["data"]
    assert len(purchases(user.id)) == 1
    other = await client.post("/billing/checkout", json={"package_id": "studio"}, headers=headers)
    assert other.status_code == 409
    assert len(purchases(user.id)) == 1


async def test_a_key_reused_after_stripe_forgot_it_never_binds_a_new_session_to_the_old_purchase(
    client, make_user, stripe_api
):
    user = await make_user()
    headers = {**user.headers, "Idempotency-Key": "buy-old"}
    first = await client.post("/billing/checkout", json={"package_id": "studio"}, headers=headers)
    assert first.status_code == 200
    stripe_api._replays.clear()  # a day later Stripe no longer knows the key, and the session has expired
    stripe_api.expire(first.json()["data"]["session_id"])
    for package_id in ("starter", "studio"):
        resp = await client.post("/billing/checkout", json={"package_id": package_id}, headers=headers)
        assert resp.status_code == 409, resp.text
    [purchase] = purchases(user.id)
    assert (purchase["package_id"], purchase["checkout_session_id"]) == ("studio", first.json()["data"]["session_id"])


async def test_a_key_replayed_after_the_pack_changed_price_returns_the_open_checkout(client, make_user, stripe_api):
    """A deploy between a click and its retry changed the pack's price: Stripe refuses the key with other parameters,
    and the buyer gets back the checkout they started, at the price it was started at."""
    user = await make_user()
    headers = {**user.headers, "Idempotency-Key": "buy-repriced"}
    first = await client.post("/billing/checkout", json={"package_id": "starter"}, headers=headers)
    assert first.status_code == 200
    for change in ("price_cents = 600", "stripe_price_id = 'price_new'"):
        sql(f"update public.credit_packages set {change} where id = 'starter'")
        try:
            again = await client.post("/billing/checkout", json={"package_id": "starter"}, headers=headers)
        finally:
            sql("update public.credit_packages set price_cents = 500, stripe_price_id = null where id = 'starter'")
        assert again.status_code == 200, again.text
        assert again.json()["data"] == first.json()["data"]
    assert len(stripe_api.posts(SESSIONS)) == 1
    [purchase] = purchases(user.id)
    assert (purchase["amount_cents"], purchase["checkout_session_id"]) == (500, first.json()["data"]["session_id"])


async def test_a_key_replayed_after_its_checkout_ended_and_the_price_changed_says_so(client, make_user, stripe_api):
    user = await make_user()
    headers = {**user.headers, "Idempotency-Key": "buy-ended"}
    first = await client.post("/billing/checkout", json={"package_id": "starter"}, headers=headers)
    stripe_api.pay(first.json()["data"]["session_id"])
    sql("update public.credit_packages set price_cents = 600 where id = 'starter'")
    try:
        again = await client.post("/billing/checkout", json={"package_id": "starter"}, headers=headers)
    finally:
        sql("update public.credit_packages set price_cents = 500 where id = 'starter'")
    assert again.status_code == 409, again.text
    assert "has ended" in again.json()["error"]["message"]
    assert len(purchases(user.id)) == 1


async def test_redirect_urls_must_be_on_allowed_origins(client, make_user, stripe_api):
    user = await make_user()
    for body in (
        {"success_url": "https://evil.example/steal"},
        {"cancel_url": "javascript:alert(1)"},
        {"success_url": "http://localhost:3000@evil.example/"},
        {"cancel_url": "http://localhost:4000/x"},
    ):
        resp = await client.post("/billing/checkout", json={"package_id": "starter", **body}, headers=user.headers)
        assert resp.status_code == 422, body
        assert resp.json()["error"]["details"][0]["field"] == next(iter(body))
    assert stripe_api.requests == []
    assert purchases(user.id) == []

    await checkout(
        client,
        user,
        success_url="http://localhost:3000/thanks?s={CHECKOUT_SESSION_ID}",
        cancel_url="http://127.0.0.1:3000/",
    )
    form = stripe_api.posts(SESSIONS)[0].form
    assert form["success_url"] == "http://localhost:3000/thanks?s={CHECKOUT_SESSION_ID}"
    assert form["cancel_url"] == "http://127.0.0.1:3000/"


async def test_the_default_success_page_is_told_its_checkout(client, make_user, stripe_api):
    """默认的成功页地址带上 {CHECKOUT_SESSION_ID}：成功页靠它查 GET /billing/checkout/{session_id}"""
    user = await make_user()
    await checkout(client, user)
    success_url = stripe_api.posts(SESSIONS)[0].form["success_url"]
    assert success_url == "http://localhost:3000/billing/success?session_id={CHECKOUT_SESSION_ID}"


async def test_unknown_or_inactive_pack_is_404(client, make_user, stripe_api):
    user = await make_user()
    resp = await client.post("/billing/checkout", json={"package_id": "nope"}, headers=user.headers)
    assert resp.status_code == 404
    assert stripe_api.requests == []


async def test_card_declined_is_a_clear_502_and_nothing_is_recorded(client, make_user, stripe_api):
    user = await make_user()
    stripe_api.fail(SESSIONS, 402, fake_stripe.CARD_DECLINED)
    resp = await client.post("/billing/checkout", json={"package_id": "starter"}, headers=user.headers)
    assert resp.status_code == 502
    error = resp.json()["error"]
    assert error["code"] == "upstream_error"
    assert "declined" in error["message"] and "Nothing was charged" in error["message"]
    assert purchases(user.id) == []
    assert balance(user.id) == 100


async def test_stripe_down_is_a_clear_502_and_nothing_is_recorded(client, make_user, stripe_api):
    user = await make_user()
    stripe_api.down()
    resp = await client.post("/billing/checkout", json={"package_id": "starter"}, headers=user.headers)
    assert resp.status_code == 502
    assert resp.json()["error"]["message"].startswith("Could not reach Stripe")
    assert purchases(user.id) == []
    assert balance(user.id) == 100


async def test_checkout_needs_sign_in(client):
    assert (await client.post("/billing/checkout", json={"package_id": "starter"})).status_code == 401


# --- the success page: a checkout's status, fulfilled on arrival -----------------------------------------------


async def checkout_status(client, user, session_id: str):
    return await client.get(f"/billing/checkout/{session_id}", headers=user.headers)


def asked_a_while_ago(session_id: str) -> None:
    """成功页上次问 Stripe 已是一分钟前"""
    sql(
        "update public.purchases set stripe_checked_at = now() - interval '1 minute' where checkout_session_id = %s",
        (session_id,),
    )


async def test_the_success_page_fulfils_a_paid_checkout_before_its_webhook(client, make_user, stripe_api):
    user = await make_user()
    session_id = (await checkout(client, user))["session_id"]
    resp = await checkout_status(client, user, session_id)
    assert resp.status_code == 200, resp.text
    assert resp.json()["data"] == {
        "session_id": session_id,
        "purchase_id": resp.json()["data"]["purchase_id"],
        "package_id": "starter",
        "credits": 500,
        "status": "pending",
    }
    assert balance(user.id) == 100

    stripe_api.pay(session_id, payment_intent="pi_landing")  # the buyer paid; the webhook is late
    asked_a_while_ago(session_id)
    resp = await checkout_status(client, user, session_id)
    assert resp.json()["data"]["status"] == "paid" and balance(user.id) == 600
    (row,) = purchases(user.id)
    assert row["payment_intent_id"] == "pi_landing"

    metadata = fake_stripe.nest(stripe_api.posts(SESSIONS)[0].form)["metadata"]
    late = fake_stripe.session(session_id, metadata, payment_intent="pi_landing")
    resp = await post_event(client, fake_stripe.event("checkout.session.completed", late))
    assert resp.json()["data"]["result"] == "already_granted" and balance(user.id) == 600
    asked = len(stripe_api.gets(f"{SESSIONS}/{session_id}"))
    assert (await checkout_status(client, user, session_id)).json()["data"]["status"] == "paid"
    assert len(stripe_api.gets(f"{SESSIONS}/{session_id}")) == asked  # settled: Stripe is not asked again


async def test_a_polled_success_page_asks_stripe_at_most_once_every_few_seconds(client, make_user, stripe_api):
    """成功页轮询（异步付款要等几天）不把每次请求都转给 Stripe：同一购买每几秒至多问一次，Stripe 的限流留给结账"""
    user = await make_user()
    session_id = (await checkout(client, user))["session_id"]
    answers = [await checkout_status(client, user, session_id) for _ in range(3)]
    answers += await asyncio.gather(*(checkout_status(client, user, session_id) for _ in range(3)))
    assert [resp.json()["data"]["status"] for resp in answers] == ["pending"] * 6
    assert len(stripe_api.gets(f"{SESSIONS}/{session_id}")) == 1

    stripe_api.pay(session_id)
    asked_a_while_ago(session_id)
    assert (await checkout_status(client, user, session_id)).json()["data"]["status"] == "paid"
    assert len(stripe_api.gets(f"{SESSIONS}/{session_id}")) == 2 and balance(user.id) == 600


async def test_the_success_page_of_an_expired_checkout_says_so(client, make_user, stripe_api):
    user = await make_user()
    session_id = (await checkout(client, user))["session_id"]
    stripe_api.expire(session_id)
    assert (await checkout_status(client, user, session_id)).json()["data"]["status"] == "expired"
    assert balance(user.id) == 100


async def test_a_checkout_is_its_buyers_alone(client, make_user, stripe_api):
    buyer, other = await make_user(), await make_user()
    session_id = (await checkout(client, buyer))["session_id"]
    stripe_api.pay(session_id)
    for user, name in ((other, session_id), (buyer, "cs_test_unknown")):
        resp = await checkout_status(client, user, name)
        assert resp.status_code == 404 and resp.json()["error"]["code"] == "not_found"
    assert balance(buyer.id) == 100 and balance(other.id) == 100


async def test_a_checkout_id_with_a_nul_character_is_refused_as_input(client, make_user):
    user = await make_user()
    resp = await checkout_status(client, user, "cs_test_%00")
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"]["details"][0]["field"] == "path.session_id"


async def test_the_success_page_answers_from_our_records_while_stripe_is_out_of_reach(client, make_user, stripe_api):
    user = await make_user()
    session_id = (await checkout(client, user))["session_id"]
    stripe_api.down()
    resp = await checkout_status(client, user, session_id)
    assert resp.status_code == 200 and resp.json()["data"]["status"] == "pending"


# --- webhook: grants ------------------------------------------------------------------------------------------


async def test_paid_session_grants_once(client, make_user, stripe_api):
    user = await make_user()
    data = await checkout(client, user)
    metadata = fake_stripe.nest(stripe_api.posts(SESSIONS)[0].form)["metadata"]
    resp = await post_event(
        client, fake_stripe.event("checkout.session.completed", fake_stripe.session(data["session_id"], metadata))
    )
    assert resp.status_code == 200, resp.text
    assert resp.json()["data"]["result"] == "granted"
    assert balance(user.id) == 600
    assert [(r["kind"], r["delta"], r["ref"]) for r in ledger(user.id)][-1] == ("purchase", 500, data["session_id"])
    (row,) = purchases(user.id)
    assert (row["status"], row["payment_intent_id"]) == ("paid", "pi_test_1")


async def test_same_event_twice_grants_once(client, make_user):
    user = await make_user()
    evt = fake_stripe.event("checkout.session.completed", fake_stripe.session("cs_twice", metadata_for(user)))
    assert (await post_event(client, evt)).json()["data"]["result"] == "granted"
    assert (await post_event(client, evt)).json()["data"]["result"] == "duplicate"
    assert balance(user.id) == 600
    assert stripe_event_count() == 1


async def test_same_event_delivered_concurrently_grants_once(client, make_user):
    user = await make_user()
    evt = fake_stripe.event("checkout.session.completed", fake_stripe.session("cs_race", metadata_for(user)))
    responses = await asyncio.gather(*(post_event(client, evt) for _ in range(4)))
    assert [r.status_code for r in responses] == [200] * 4
    assert sorted(r.json()["data"]["result"] for r in responses) == ["duplicate"] * 3 + ["granted"]
    assert balance(user.id) == 600
    assert len(purchases(user.id)) == 1


async def test_two_events_for_one_session_grant_once(client, make_user):
    user = await make_user()
    obj = fake_stripe.session("cs_two", metadata_for(user))
    completed = fake_stripe.event("checkout.session.completed", obj)
    succeeded = fake_stripe.event("checkout.session.async_payment_succeeded", obj)
    responses = await asyncio.gather(post_event(client, completed), post_event(client, succeeded))
    assert sorted(r.json()["data"]["result"] for r in responses) == ["already_granted", "granted"]
    assert balance(user.id) == 600
    assert stripe_event_count() == 2


async def test_async_success_after_pending_completion_grants_once(client, make_user, stripe_api):
    user = await make_user()
    data = await checkout(client, user)
    metadata = fake_stripe.nest(stripe_api.posts(SESSIONS)[0].form)["metadata"]
    unpaid = fake_stripe.session(data["session_id"], metadata, payment_status="unpaid")
    assert (await post_event(client, fake_stripe.event("checkout.session.completed", unpaid))).status_code == 200
    assert balance(user.id) == 100
    assert purchases(user.id)[0]["status"] == "pending"

    paid = fake_stripe.session(data["session_id"], metadata)
    await post_event(client, fake_stripe.event("checkout.session.async_payment_succeeded", paid))
    await post_event(client, fake_stripe.event("checkout.session.async_payment_succeeded", paid))  # a redelivery
    assert balance(user.id) == 600
    assert purchases(user.id)[0]["status"] == "paid"


async def test_a_checkout_with_nothing_to_pay_grants_the_pack_and_records_nothing_paid(
    client, make_user, stripe_api, caplog
):
    """Stripe 说无需付款（100% 的优惠券、价格为 0 的 Price）：会话完成即发放积分，记下实付 0，不被当成退了款收回"""
    user = await make_user()
    session_id = (await checkout(client, user))["session_id"]
    metadata = fake_stripe.nest(stripe_api.posts(SESSIONS)[0].form)["metadata"]
    free = fake_stripe.session(
        session_id, metadata, payment_status="no_payment_required", payment_intent=None, amount_total=0
    )
    evt = fake_stripe.event("checkout.session.completed", free)
    assert (await post_event(client, evt)).json()["data"]["result"] == "granted"
    again = await post_event(client, {**evt, "id": evt["id"] + "_again"})
    assert again.json()["data"]["result"] == "already_granted"
    assert balance(user.id) == 600
    assert kinds(user.id) == [("grant", 100), ("purchase", 500)]
    (row,) = purchases(user.id)
    assert (row["status"], row["amount_cents"], row["currency"], row["credits_clawed_back"]) == ("paid", 0, "usd", 0)
    assert row["clawback_shortfall"] == 0
    assert f"stripe session {session_id} paid 0 usd for pack starter, priced 500 usd at checkout" in caplog.text


async def test_the_success_page_settles_a_checkout_with_nothing_to_pay(client, make_user, stripe_api):
    user = await make_user()
    session_id = (await checkout(client, user))["session_id"]
    stripe_api.sessions[session_id].update(
        status="complete", payment_status="no_payment_required", amount_total=0, currency="usd"
    )
    asked_a_while_ago(session_id)
    assert (await checkout_status(client, user, session_id)).json()["data"]["status"] == "paid"
    assert balance(user.id) == 600


@pytest.mark.parametrize(
    ("kind", "status"), [("checkout.session.async_payment_failed", "failed"), ("checkout.session.expired", "expired")]
)
async def test_failed_or_expired_session_grants_nothing(client, make_user, stripe_api, kind, status):
    user = await make_user()
    data = await checkout(client, user)
    metadata = fake_stripe.nest(stripe_api.posts(SESSIONS)[0].form)["metadata"]
    obj = fake_stripe.session(data["session_id"], metadata, payment_status="unpaid", status="expired")
    resp = await post_event(client, fake_stripe.event(kind, obj))
    assert resp.json()["data"]["status"] == status
    assert purchases(user.id)[0]["status"] == status
    assert balance(user.id) == 100
    assert kinds(user.id) == [("grant", 100)]


async def test_another_session_of_a_purchase_expiring_leaves_the_purchase_as_it_is(client, make_user, stripe_api):
    """A key reused after Stripe forgot it makes a second session under the same purchase (never handed out, 409):
    its expiry says nothing of the checkout the buyer is paying by bank transfer."""
    user = await make_user()
    data = await checkout(client, user)
    metadata = fake_stripe.nest(stripe_api.posts(SESSIONS)[0].form)["metadata"]
    waiting = fake_stripe.session(data["session_id"], metadata, payment_status="unpaid")
    await post_event(client, fake_stripe.event("checkout.session.completed", waiting))
    orphan = fake_stripe.session("cs_orphan", metadata, payment_status="unpaid", status="expired")
    resp = await post_event(client, fake_stripe.event("checkout.session.expired", orphan))
    assert resp.status_code == 200 and resp.json()["data"]["result"] == "ignored"
    assert [(p["status"], p["checkout_session_id"]) for p in purchases(user.id)] == [("pending", data["session_id"])]


async def test_an_event_of_the_other_stripe_mode_grants_nothing(client, make_user, caplog):
    """测试模式的付款不给线上部署发积分（反之亦然）：Webhook 密钥配错时，事件照样签名正确"""
    user = await make_user()
    evt = fake_stripe.event("checkout.session.completed", fake_stripe.session("cs_live", metadata_for(user)))
    resp = await post_event(client, {**evt, "livemode": True})  # conftest's STRIPE_SECRET_KEY is a test key
    assert resp.status_code == 200 and resp.json()["data"]["result"] == "wrong_mode"
    assert balance(user.id) == 100
    assert purchases(user.id) == []
    assert "live-mode event" in caplog.text


async def test_other_events_are_acknowledged_and_ignored(client, make_user):
    user = await make_user()
    resp = await post_event(client, fake_stripe.event("customer.created", {"id": "cus_x", "object": "customer"}))
    assert resp.status_code == 200
    assert resp.json()["data"]["result"] == "ignored"
    # A charge we never sold (no metadata, unknown PaymentIntent) is ignored too.
    resp = await post_event(
        client,
        fake_stripe.event("charge.refunded", fake_stripe.charge({}, amount_refunded=500, payment_intent="pi_unknown")),
    )
    assert resp.json()["data"]["result"] == "ignored"
    assert balance(user.id) == 100


# --- webhook: refunds -----------------------------------------------------------------------------------------


async def test_refunds_claw_back_the_refunded_share_once(client, make_user):
    user = await make_user()
    metadata = metadata_for(user)
    await post_event(client, fake_stripe.event("checkout.session.completed", fake_stripe.session("cs_r", metadata)))
    half = fake_stripe.event("charge.refunded", fake_stripe.charge(metadata, amount_refunded=250))
    assert (await post_event(client, half)).status_code == 200
    await post_event(client, half)  # a redelivery owes nothing more
    assert balance(user.id) == 350
    assert purchases(user.id)[0]["status"] == "partially_refunded"

    full = fake_stripe.event("charge.refunded", fake_stripe.charge(metadata, amount_refunded=500))
    await post_event(client, full)
    # An older refund event arriving late (cumulative 250 < 500) changes nothing.
    await post_event(client, fake_stripe.event("charge.refunded", fake_stripe.charge(metadata, amount_refunded=250)))
    assert balance(user.id) == 100
    assert kinds(user.id) == [("grant", 100), ("purchase", 500), ("clawback", -250), ("clawback", -250)]
    (row,) = purchases(user.id)
    assert (row["status"], row["credits_clawed_back"], row["clawback_shortfall"]) == ("refunded", 500, 0)


async def test_clawback_never_goes_below_zero_and_records_the_shortfall(client, make_user):
    user = await make_user()
    metadata = metadata_for(user)
    await post_event(client, fake_stripe.event("checkout.session.completed", fake_stripe.session("cs_s", metadata)))
    set_balance(user.id, 120)  # most of the pack was spent
    resp = await post_event(
        client, fake_stripe.event("charge.refunded", fake_stripe.charge(metadata, amount_refunded=500))
    )
    assert resp.json()["data"]["clawback_shortfall"] == 380
    assert balance(user.id) == 0
    (row,) = purchases(user.id)
    assert (row["status"], row["credits_clawed_back"], row["clawback_shortfall"]) == ("refunded", 120, 380)


@pytest.mark.parametrize(
    ("refunded", "expected_balance", "status"), [(500, 100, "refunded"), (100, 500, "partially_refunded")]
)
async def test_refund_before_completion_ends_in_the_right_balance(
    client, make_user, stripe_api, refunded, expected_balance, status
):
    user = await make_user()
    data = await checkout(client, user)
    metadata = fake_stripe.nest(stripe_api.posts(SESSIONS)[0].form)["payment_intent_data"]["metadata"]
    resp = await post_event(
        client, fake_stripe.event("charge.refunded", fake_stripe.charge(metadata, amount_refunded=refunded))
    )
    assert resp.status_code == 200
    assert balance(user.id) == 100  # nothing granted yet, nothing to take back
    assert purchases(user.id)[0]["amount_refunded_cents"] == refunded

    completed = fake_stripe.event("checkout.session.completed", fake_stripe.session(data["session_id"], metadata))
    assert (await post_event(client, completed)).status_code == 200
    assert balance(user.id) == expected_balance
    (row,) = purchases(user.id)
    assert (row["status"], row["credits_clawed_back"]) == (status, 500 * refunded // 500)


async def test_refund_first_without_a_pending_row_then_completion(client, make_user):
    user = await make_user()
    metadata = metadata_for(user, "creator")  # the checkout call never recorded its row
    await post_event(
        client, fake_stripe.event("charge.refunded", fake_stripe.charge(metadata, amount=2000, amount_refunded=2000))
    )
    await post_event(
        client,
        fake_stripe.event("checkout.session.completed", fake_stripe.session("cs_late", metadata, amount_total=2000)),
    )
    assert balance(user.id) == 100
    assert kinds(user.id) == [("grant", 100), ("purchase", 2200), ("clawback", -2200)]
    (row,) = purchases(user.id)
    assert (str(row["id"]), row["checkout_session_id"], row["status"]) == (
        metadata["purchase_id"],
        "cs_late",
        "refunded",
    )


def new_task(user_id: str, cost: int) -> str:
    """直接用 create_task 扣费建一个排队的任务"""
    row = sql("select public.create_task(%s, 'image.upscale', '{}'::jsonb, %s) as r", (user_id, cost))[0]["r"]
    return row["task"]["id"]


async def test_credits_coming_back_later_pay_off_a_shortfall_first(client, make_user):
    """先买、把积分押在排队任务上、退款，再取消任务：退回的积分先还欠下的，钱和积分不能两头得"""
    user = await make_user()
    set_balance(user.id, 0)
    metadata = await bought(client, user, "cs_sf", "pi_sf")
    tasks = [new_task(user.id, 250), new_task(user.id, 250)]
    refund = fake_stripe.charge(metadata, amount_refunded=500, payment_intent="pi_sf")
    assert (await post_event(client, fake_stripe.event("charge.refunded", refund))).json()["data"][
        "clawback_shortfall"
    ] == 500
    sql("select public.finish_task(%s, 'canceled')", (tasks[0],))
    assert balance(user.id) == 0
    (row,) = purchases(user.id)
    assert (row["credits_clawed_back"], row["clawback_shortfall"]) == (250, 250)
    sql("select public.finish_task(%s, 'failed')", (tasks[1],))
    sql("select public.grant_credits(%s, 40, 'adjustment', %s)", (user.id, f"support:{user.id}"))
    assert balance(user.id) == 40  # the shortfall is paid off; what comes after it is the user's
    (row,) = purchases(user.id)
    assert (row["credits_clawed_back"], row["clawback_shortfall"]) == (500, 0)
    assert sum(entry["delta"] for entry in ledger(user.id)) == 40


async def test_a_chargeback_takes_the_credits_back_and_a_dispute_won_returns_them(client, make_user):
    user = await make_user()
    await bought(client, user, "cs_dp", "pi_dp")
    set_balance(user.id, 520)  # 80 credits of the pack spent
    created = fake_stripe.event("charge.dispute.created", fake_stripe.dispute(payment_intent="pi_dp"))
    assert (await post_event(client, created)).json()["data"]["result"] == "ignored"  # no money moved yet
    withdrawn = fake_stripe.event("charge.dispute.funds_withdrawn", fake_stripe.dispute(payment_intent="pi_dp"))
    assert (await post_event(client, withdrawn)).json()["data"]["result"] == "recorded"
    await post_event(client, {**withdrawn, "id": withdrawn["id"] + "_again"})  # owes nothing more
    assert balance(user.id) == 20
    (row,) = purchases(user.id)
    assert (row["status"], row["credits_clawed_back"], row["amount_disputed_cents"]) == ("disputed", 500, 500)

    won = fake_stripe.event(
        "charge.dispute.funds_reinstated", fake_stripe.dispute(payment_intent="pi_dp", status="won")
    )
    assert (await post_event(client, won)).status_code == 200
    await post_event(client, {**won, "id": won["id"] + "_again"})
    assert balance(user.id) == 520
    (row,) = purchases(user.id)
    assert (row["status"], row["credits_clawed_back"], row["amount_disputed_cents"]) == ("paid", 0, 0)
    assert sum(entry["delta"] for entry in ledger(user.id)) == 520


async def test_amounts_no_payment_can_have_are_not_taken_at_their_word(client, make_user):
    """签名正确但金额大得离谱（超出 Stripe 的 12 位上限）的退款、争议：不当真，不出 500"""
    user = await make_user()
    await bought(client, user, "cs_big", "pi_big")
    huge = 2**62
    withdrawn = fake_stripe.event(
        "charge.dispute.funds_withdrawn", fake_stripe.dispute(amount=huge, payment_intent="pi_big")
    )
    refunded = fake_stripe.event(
        "charge.refunded", fake_stripe.charge({}, amount=huge, amount_refunded=huge, payment_intent="pi_big")
    )
    for event in (withdrawn, refunded):
        assert (await post_event(client, event)).status_code < 500
    assert balance(user.id) == 100  # an amount no payment can have counts as the whole payment: the pack taken back


async def test_an_event_id_longer_than_stripe_makes_is_refused_not_retried(client, make_user):
    user = await make_user()
    evt = fake_stripe.event(
        "checkout.session.completed", fake_stripe.session("cs_long", metadata_for(user)), "evt_" + "x" * 500_000
    )
    resp = await post_event(client, evt)
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_webhook"  # a 5xx is retried for days
    assert balance(user.id) == 100


async def test_a_dispute_won_forgives_the_shortfall_before_returning_credits(client, make_user):
    user = await make_user()
    await bought(client, user, "cs_dp2", "pi_dp2")
    set_balance(user.id, 200)
    dispute = fake_stripe.dispute(payment_intent="pi_dp2")
    await post_event(client, fake_stripe.event("charge.dispute.funds_withdrawn", dispute))
    assert balance(user.id) == 0
    (row,) = purchases(user.id)
    assert (row["credits_clawed_back"], row["clawback_shortfall"]) == (200, 300)
    await post_event(client, fake_stripe.event("charge.dispute.funds_reinstated", dispute))
    assert balance(user.id) == 200
    (row,) = purchases(user.id)
    assert (row["status"], row["credits_clawed_back"], row["clawback_shortfall"]) == ("paid", 0, 0)


async def test_a_payment_that_does_not_match_its_pack_is_granted_and_logged(client, make_user, caplog):
    user = await make_user()
    metadata = metadata_for(user, "studio")
    cheap = fake_stripe.session("cs_cheap", metadata, payment_intent="pi_cheap", amount_total=1)
    resp = await post_event(client, fake_stripe.event("checkout.session.completed", cheap))
    assert resp.json()["data"]["result"] == "granted"  # the customer paid what Stripe asked: the pack is theirs
    assert "paid 1 usd for pack studio, priced 5000 usd at checkout" in caplog.text
    assert "price" not in resp.json()["data"]


async def test_a_payment_at_the_price_its_checkout_recorded_logs_no_mismatch(client, make_user, stripe_api, caplog):
    """结账后积分包改了价，或买家以另一种币种付款：与购买记下的价格比，不算不符，不报警"""
    user = await make_user()
    started = [(await checkout(client, user))["session_id"] for _ in range(3)]  # each priced 500 usd
    metadata = [fake_stripe.nest(r.form)["metadata"] for r in stripe_api.posts(SESSIONS)]
    paid = [
        fake_stripe.session(started[0], metadata[0], payment_intent="pi_m0"),
        in_euros(fake_stripe.session(started[1], metadata[1], payment_intent="pi_m1")),
        {**fake_stripe.session(started[2], metadata[2], payment_intent="pi_m2", amount_total=460), "currency": "eur"},
    ]
    sql("update public.credit_packages set price_cents = 600 where id = 'starter'")  # a new price, after checkout
    try:
        for obj in paid:
            resp = await post_event(client, fake_stripe.event("checkout.session.completed", obj))
            assert resp.json()["data"]["result"] == "granted"
    finally:
        sql("update public.credit_packages set price_cents = 500 where id = 'starter'")
    assert "stripe_price_id" not in caplog.text
    assert balance(user.id) == 1600

    # A payment that differs from its checkout's price in that price's currency is still worth a look.
    session_id = (await checkout(client, user))["session_id"]
    metadata = fake_stripe.nest(stripe_api.posts(SESSIONS)[-1].form)["metadata"]
    discounted = fake_stripe.session(session_id, metadata, payment_intent="pi_m3", amount_total=250)
    await post_event(client, fake_stripe.event("checkout.session.completed", discounted))
    assert f"stripe session {session_id} paid 250 usd for pack starter, priced 500 usd at checkout" in caplog.text


async def test_a_mismatched_payment_settled_by_the_success_page_is_logged(client, make_user, stripe_api, caplog):
    """成功页先发放时，其 webhook 只见 already_granted：不符的警告由成功页记下"""
    user = await make_user()
    session_id = (await checkout(client, user))["session_id"]
    paid = stripe_api.pay(session_id, payment_intent="pi_page", amount_total=250)
    asked_a_while_ago(session_id)
    assert (await checkout_status(client, user, session_id)).json()["data"]["status"] == "paid"
    assert f"stripe session {session_id} paid 250 usd for pack starter, priced 500 usd at checkout" in caplog.text
    resp = await post_event(client, fake_stripe.event("checkout.session.completed", paid))
    assert resp.json()["data"] == {**resp.json()["data"], "result": "already_granted"}
    assert "price" not in resp.json()["data"]


async def test_a_refund_while_a_webhook_holds_the_purchase_still_pays_off_its_shortfall(client, make_user):
    """退款任务与同一购买的 webhook 同时进行：触发器跳过被锁的购买，webhook 持有余额锁，退回的积分照样先还欠款"""
    from tests.test_assets import while_held

    user = await make_user()
    set_balance(user.id, 0)
    metadata = metadata_for(user)
    await post_event(client, fake_stripe.event("checkout.session.completed", fake_stripe.session("cs_h", metadata)))
    tasks = [new_task(user.id, 250), new_task(user.id, 250)]
    refund = fake_stripe.charge(metadata, amount_refunded=500)
    await post_event(client, fake_stripe.event("charge.refunded", refund))
    assert purchases(user.id)[0]["clawback_shortfall"] == 500
    redelivered = (metadata["purchase_id"], "pi_test_1", user.id, "starter", 500, 500)
    _, canceled = await while_held(
        lambda conn: conn.execute("select public.apply_charge_refunded(%s, %s, %s, %s, %s, %s)", redelivered),
        client.post(f"/tasks/{tasks[0]}/cancel", headers=user.headers),
    )
    assert canceled.status_code == 200, canceled.text
    assert balance(user.id) == 0
    (row,) = purchases(user.id)
    assert (row["credits_clawed_back"], row["clawback_shortfall"]) == (250, 250)


async def test_a_chargeback_of_a_payment_in_the_buyers_currency_takes_back_the_whole_pack(client, make_user):
    """Adaptive Pricing：会话金额是 5 美元，实际扣款（及其退款、争议）是 4.60 欧元：全额拒付收回整个包"""
    user = await make_user()
    localized = {
        **fake_stripe.session("cs_eur", metadata_for(user), payment_intent="pi_eur"),
        "presentment_details": {"presentment_amount": 460, "presentment_currency": "eur"},
    }
    await post_event(client, fake_stripe.event("checkout.session.completed", localized))
    assert balance(user.id) == 600
    chargeback = {**fake_stripe.dispute(amount=460, payment_intent="pi_eur"), "currency": "eur"}
    await post_event(client, fake_stripe.event("charge.dispute.funds_withdrawn", chargeback))
    assert balance(user.id) == 100
    (row,) = purchases(user.id)
    assert (row["status"], row["credits_clawed_back"], row["clawback_shortfall"]) == ("disputed", 500, 0)


def in_euros(obj: dict, amount: int = 460) -> dict:
    """Adaptive Pricing：会话仍以美元计，买家实付欧元"""
    return {**obj, "presentment_details": {"presentment_amount": amount, "presentment_currency": "eur"}}


async def test_a_payment_in_another_currency_is_recorded_in_the_currency_paid(client, make_user, stripe_api):
    """实付金额与其币种一起记下：4.60 欧元记为 460 eur，而不是 460 usd"""
    user = await make_user()
    adaptive = (await checkout(client, user))["session_id"]
    priced_in_yen = (await checkout(client, user))["session_id"]  # a stripe_price_id in yen, or per-currency prices
    metadata = [fake_stripe.nest(r.form)["metadata"] for r in stripe_api.posts(SESSIONS)]
    paid = [
        in_euros(fake_stripe.session(adaptive, metadata[0], payment_intent="pi_adaptive")),
        {
            **fake_stripe.session(priced_in_yen, metadata[1], payment_intent="pi_yen", amount_total=780),
            "currency": "jpy",
        },
    ]
    for obj in paid:
        resp = await post_event(client, fake_stripe.event("checkout.session.completed", obj))
        assert resp.json()["data"]["result"] == "granted"
    rows = {p["checkout_session_id"]: (p["amount_cents"], p["currency"], p["status"]) for p in purchases(user.id)}
    assert rows == {adaptive: (460, "eur", "paid"), priced_in_yen: (780, "jpy", "paid")}
    assert balance(user.id) == 1100


async def test_a_refund_in_another_currency_before_its_payment_is_recorded_in_that_currency(
    client, make_user, stripe_api
):
    user = await make_user()
    session_id = (await checkout(client, user))["session_id"]
    metadata = fake_stripe.nest(stripe_api.posts(SESSIONS)[0].form)["payment_intent_data"]["metadata"]
    refund = {**fake_stripe.charge(metadata, amount=460, amount_refunded=100, payment_intent="pi_r"), "currency": "eur"}
    await post_event(client, fake_stripe.event("charge.refunded", refund))
    (row,) = purchases(user.id)
    assert (row["amount_cents"], row["currency"], row["status"]) == (460, "eur", "pending")

    paid = in_euros(fake_stripe.session(session_id, metadata, payment_intent="pi_r"))
    await post_event(client, fake_stripe.event("checkout.session.completed", paid))
    (row,) = purchases(user.id)
    assert (row["amount_cents"], row["currency"], row["status"]) == (460, "eur", "partially_refunded")
    assert row["credits_clawed_back"] == 500 * 100 // 460
    assert balance(user.id) == 100 + 500 - 500 * 100 // 460


async def test_the_former_paid_signature_still_grants(client, make_user):
    """部署期间旧版 API 仍按旧签名调用 apply_checkout_paid：照样发放，金额照旧记下"""
    user = await make_user()
    metadata = metadata_for(user)
    args = (metadata["purchase_id"], "cs_former", "pi_former", user.id, "starter", 500)
    row = sql("select public.apply_checkout_paid(%s, %s, %s, %s, %s, %s) as r", args)[0]["r"]
    assert row["result"] == "granted" and balance(user.id) == 600
    (purchase,) = purchases(user.id)
    assert (purchase["amount_cents"], purchase["currency"], purchase["status"]) == (500, "usd", "paid")


async def test_a_late_withdrawal_of_a_dispute_already_won_takes_nothing(client, make_user):
    user = await make_user()
    await bought(client, user, "cs_late", "pi_late")
    dispute = fake_stripe.dispute(payment_intent="pi_late")
    await post_event(client, fake_stripe.event("charge.dispute.funds_reinstated", {**dispute, "status": "won"}))
    late = await post_event(client, fake_stripe.event("charge.dispute.funds_withdrawn", dispute))
    assert late.status_code == 200 and late.json()["data"]["result"] == "already_won"
    assert balance(user.id) == 600
    assert purchases(user.id)[0]["status"] == "paid"


async def test_collecting_shortfalls_never_writes_an_empty_clawback(client, make_user):
    user = await make_user()
    for n in (1, 2):
        metadata = await bought(client, user, f"cs_z{n}", f"pi_z{n}")
        set_balance(user.id, 0)
        refund = fake_stripe.charge(metadata, amount_refunded=500, payment_intent=f"pi_z{n}")
        await post_event(client, fake_stripe.event("charge.refunded", refund))
    sql("select public.grant_credits(%s, 10, 'adjustment', %s)", (user.id, f"support:{user.id}"))
    assert balance(user.id) == 0
    assert [row["delta"] for row in ledger(user.id) if row["kind"] == "clawback"][-1] == -10
    assert all(row["delta"] != 0 for row in ledger(user.id) if row["kind"] == "clawback")
    # The first refund's 500 was collected from the second pack; the second refund is 10 credits into its 500.
    assert [row["clawback_shortfall"] for row in purchases(user.id)] == [0, 490]


async def test_a_chargeback_before_the_payment_is_recorded_is_taken_back_at_the_grant(client, make_user, stripe_api):
    """The chargeback arrives while the checkout's own events are still being retried (a webhook down, Dashboard
    resends): its PaymentIntent names the purchase, and the grant that follows takes the disputed credits back."""
    user = await make_user()
    session_id = (await checkout(client, user))["session_id"]
    paid = stripe_api.pay(session_id, payment_intent="pi_early")
    withdrawn = fake_stripe.event("charge.dispute.funds_withdrawn", fake_stripe.dispute(payment_intent="pi_early"))
    resp = await post_event(client, withdrawn)
    assert resp.status_code == 200 and resp.json()["data"]["result"] == "recorded", resp.text
    assert balance(user.id) == 100
    resp = await post_event(client, fake_stripe.event("checkout.session.completed", paid))
    assert resp.json()["data"]["result"] == "granted"
    assert balance(user.id) == 100
    (row,) = purchases(user.id)
    assert (row["status"], row["payment_intent_id"], row["credits_clawed_back"]) == ("disputed", "pi_early", 500)


async def test_a_dispute_that_matches_no_purchase_is_logged(client, caplog, stripe_api):
    evt = fake_stripe.event("charge.dispute.funds_withdrawn", fake_stripe.dispute(payment_intent="pi_nobody"))
    resp = await post_event(client, evt)
    assert resp.json()["data"]["result"] == "ignored"
    assert "pi_nobody matches no purchase" in caplog.text


@pytest.mark.parametrize("kind", ["checkout.session.completed", "checkout.session.expired", "charge.refunded"])
async def test_an_event_about_a_deleted_account_is_answered_not_retried(client, make_user, stripe_api, kind, caplog):
    user = await make_user()
    await checkout(client, user)
    metadata = fake_stripe.nest(stripe_api.posts(SESSIONS)[0].form)["payment_intent_data"]["metadata"]
    session_id = stripe_api.posts(SESSIONS)[0] and purchases(user.id)[0]["checkout_session_id"]
    sql("delete from auth.users where id = %s", (user.id,))
    obj = (
        fake_stripe.charge(metadata, amount_refunded=500, payment_intent="pi_gone")
        if kind == "charge.refunded"
        else fake_stripe.session(
            session_id,
            metadata,
            payment_intent="pi_gone",
            payment_status="paid" if kind.endswith("completed") else "unpaid",
        )
    )
    resp = await post_event(client, fake_stripe.event(kind, obj))
    assert resp.status_code == 200, resp.text
    assert resp.json()["data"]["result"] == "orphaned"
    assert "deleted user" in caplog.text and "pi_gone" in caplog.text
    with connect() as conn:
        assert (
            conn.execute("select count(*) as n from public.purchases where user_id = %s", (user.id,)).fetchone()["n"]
            == 0
        )


async def test_a_customer_stripe_no_longer_knows_is_replaced(client, make_user, stripe_api):
    """测试模式下存的客户 id 切到正式密钥后不存在：换一个新客户，用户仍能购买"""
    user = await make_user()
    sql("update public.profiles set stripe_customer_id = 'cus_testmode' where id = %s", (user.id,))
    stripe_api.missing_customers.add("cus_testmode")
    data = await checkout(client, user)
    assert data["session_id"].startswith("cs_test_fake")
    (created,) = stripe_api.posts(CUSTOMERS)
    assert created.headers["idempotency-key"] == f"customer-{user.id}-after-cus_testmode"
    saved = sql("select stripe_customer_id from public.profiles where id = %s", (user.id,))[0]["stripe_customer_id"]
    assert saved != "cus_testmode" and stripe_api.posts(SESSIONS)[-1].form["customer"] == saved
    await checkout(client, user, "creator")  # and it sticks
    assert len(stripe_api.posts(CUSTOMERS)) == 1


def test_webhook_tolerance_must_be_positive(monkeypatch):
    from pydantic import ValidationError

    from lib.config import Settings

    monkeypatch.setenv("STRIPE_WEBHOOK_TOLERANCE", "0")  # 0 would accept a replay of any old event
    with pytest.raises(ValidationError):
        Settings()


# --- webhook: rejected and failed deliveries -------------------------------------------------------------------


@pytest.mark.parametrize(
    "case",
    ["bad_signature", "wrong_secret", "stale", "missing_header", "malformed_json", "not_an_event", "garbled_header"],
)
async def test_unverified_or_malformed_webhook_is_400_and_writes_nothing(client, make_user, case):
    user = await make_user()
    evt = fake_stripe.event("checkout.session.completed", fake_stripe.session("cs_bad", metadata_for(user)))
    payload = json.dumps(evt)
    if case == "bad_signature":
        resp = await post_event(client, payload, signature=fake_stripe.sign(payload + " ", SECRET))
    elif case == "wrong_secret":
        resp = await post_event(client, payload, secret="whsec_other")
    elif case == "stale":
        resp = await post_event(client, payload, timestamp=int(time.time()) - 301)
    elif case == "missing_header":
        resp = await post_event(client, payload, headers={"Content-Type": "application/json"})
    elif case == "malformed_json":
        resp = await post_event(client, payload[:-5])
    elif case == "not_an_event":
        resp = await post_event(client, "[1, 2]")
    else:
        resp = await post_event(client, payload, signature="nonsense")
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["code"] == "invalid_webhook"
    assert stripe_event_count() == 0
    assert purchases(user.id) == []
    assert balance(user.id) == 100


async def test_a_webhook_signed_with_another_secret_is_logged_for_the_operator(client, make_user, caplog):
    """签名对不上（STRIPE_WEBHOOK_SECRET 配错时每个事件都这样）在日志里写明，而不只是访问日志里的 400"""
    user = await make_user()
    evt = fake_stripe.event("checkout.session.completed", fake_stripe.session("cs_secret", metadata_for(user)))
    resp = await post_event(client, evt, secret="whsec_of_another_endpoint")
    assert resp.status_code == 400
    (record,) = [r for r in caplog.records if r.name == "spool.billing" and r.levelname == "WARNING"]
    assert "STRIPE_WEBHOOK_SECRET" in record.getMessage()


async def test_a_signature_header_that_is_not_ascii_is_named_as_the_problem(client, make_user):
    user = await make_user()
    evt = fake_stripe.event("checkout.session.completed", fake_stripe.session("cs_x", metadata_for(user)))
    payload = json.dumps(evt)
    signature = fake_stripe.sign(payload, SECRET).encode()[:-2] + "é".encode()
    headers = [(b"stripe-signature", signature), (b"content-type", b"application/json")]
    resp = await client.post("/billing/webhook", content=payload, headers=headers)
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_webhook"
    assert "signature" in resp.json()["error"]["message"]
    assert stripe_event_count() == 0 and balance(user.id) == 100


@pytest.mark.parametrize(
    "odd",
    [
        {"metadata": "oops"},
        {"metadata": {"package_id": 7, "purchase_id": ["x"], "user_id": {}}},
        {"amount_total": "abc", "payment_intent": 5},
        {"amount_total": 10**30, "payment_intent": {"id": True}},
    ],
)
async def test_a_signed_event_of_an_odd_shape_is_answered_not_500(client, make_user, odd):
    user = await make_user()
    obj = {**fake_stripe.session(f"cs_odd_{uuid.uuid4().hex}", metadata_for(user)), **odd}
    resp = await post_event(client, fake_stripe.event("checkout.session.completed", obj))
    assert resp.status_code == 200, resp.text
    assert balance(user.id) in (100, 600)  # the user's pack when the event still names it, nothing else
    assert sum(delta for _, delta in kinds(user.id)) == balance(user.id)


@pytest.mark.parametrize("bad", ["\x00", "\ud800"], ids=["nul", "lone-surrogate"])
async def test_a_signed_event_with_unstorable_text_is_refused_not_500(client, make_user, bad):
    user = await make_user()
    evt = fake_stripe.event("checkout.session.completed", fake_stripe.session("cs_bad", metadata_for(user)))
    resp = await post_event(client, {**evt, "id": f"evt_{bad}"})
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_webhook"
    obj = fake_stripe.session(f"cs_{bad}", metadata_for(user))  # in the session id: nothing to store it as
    resp = await post_event(client, fake_stripe.event("checkout.session.completed", obj))
    assert resp.status_code == 200 and balance(user.id) == 100
    obj = fake_stripe.session("cs_bad_pack", {**metadata_for(user), "package_id": f"starter{bad}"})
    resp = await post_event(client, fake_stripe.event("checkout.session.completed", obj))
    assert resp.status_code == 200 and balance(user.id) == 100


async def test_timestamp_within_tolerance_is_accepted(client, make_user):
    user = await make_user()
    evt = fake_stripe.event("checkout.session.completed", fake_stripe.session("cs_old", metadata_for(user)))
    resp = await post_event(client, evt, timestamp=int(time.time()) - 240)
    assert resp.status_code == 200
    assert balance(user.id) == 600


@pytest.fixture
def purchases_refuse_writes():
    """数据库写购买记录时出错（像一次故障）"""
    sql(
        "create function public.refuse_purchase() returns trigger language plpgsql as"
        " $$ begin raise exception 'disk full'; end $$;"
        " create trigger refuse_purchase before insert or update on public.purchases"
        " for each row execute function public.refuse_purchase()"
    )
    yield
    sql("drop trigger refuse_purchase on public.purchases; drop function public.refuse_purchase()")


async def test_error_while_applying_is_500_and_nothing_half_applied(client, make_user, purchases_refuse_writes):
    user = await make_user()
    metadata = metadata_for(user)
    evt = fake_stripe.event("checkout.session.completed", fake_stripe.session("cs_ghost", metadata))
    resp = await post_event(client, evt)
    assert resp.status_code == 500
    assert resp.json()["error"]["code"] == "internal_error"
    assert stripe_event_count() == 0  # Stripe retries; the event is not marked as seen
    with connect() as conn:
        assert conn.execute("select count(*) as n from public.purchases").fetchone()["n"] == 0
    assert balance(user.id) == 100


async def test_webhook_without_a_configured_secret_is_503(client, monkeypatch):
    monkeypatch.setenv("STRIPE_WEBHOOK_SECRET", "")
    get_settings.cache_clear()
    try:
        evt = fake_stripe.event("customer.created", {"id": "cus_x", "object": "customer"})
        resp = await post_event(client, evt)
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
    assert resp.status_code == 503
    assert "STRIPE_WEBHOOK_SECRET" in resp.json()["error"]["message"]
    assert stripe_event_count() == 0


@pytest.mark.parametrize("stand_in", ["whsec_pending", "whsec_..."])
async def test_a_webhook_secret_that_is_a_stand_in_verifies_nothing(client, make_user, monkeypatch, stand_in):
    """部署步骤里先填的 whsec_pending（或照抄的 whsec_...）人人可知：用它签名的事件不发放积分，503 让 Stripe 稍后重试"""
    user = await make_user()
    monkeypatch.setenv("STRIPE_WEBHOOK_SECRET", stand_in)
    get_settings.cache_clear()
    try:
        paid = fake_stripe.session("cs_forged", metadata_for(user, "creator"), payment_intent="pi_forged")
        resp = await post_event(client, fake_stripe.event("checkout.session.completed", paid), secret=stand_in)
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
    assert resp.status_code == 503, resp.text
    assert "STRIPE_WEBHOOK_SECRET" in resp.json()["error"]["message"]
    assert balance(user.id) == 100 and purchases(user.id) == []
    assert stripe_event_count() == 0  # not marked processed: Stripe's retry after the real secret is set counts


def test_checkout_status_schema_names_every_purchase_status():
    import re
    from pathlib import Path

    from functions.billing import CheckoutStatus

    migrations = sorted((Path(__file__).resolve().parents[1] / "supabase" / "migrations").glob("*.sql"))
    checks = [
        m.group(1)
        for path in migrations
        for m in re.finditer(r"purchases_status_check\s+check \(status in \(([^)]*)\)\)", path.read_text())
    ]
    statuses = re.findall(r"'(\w+)'", checks[-1])  # the latest constraint is the one in force
    description = CheckoutStatus.model_fields["status"].description
    assert set(re.findall(r"\w+", description.replace(" or ", ", "))) >= set(statuses), description
