"""Health, the response envelopes and the request id."""


async def test_health_reports_database(client):
    resp = await client.get("/health")
    assert resp.status_code == 200
    assert resp.json() == {"success": True, "data": {"status": "ok", "db": "ok"}}
    assert resp.headers["x-request-id"]


async def test_unknown_route_is_404_envelope(client):
    resp = await client.get("/no-such-route")
    body = resp.json()
    assert resp.status_code == 404
    assert body["success"] is False
    assert body["error"]["code"] == "not_found"
    assert body["request_id"] == resp.headers["x-request-id"]


async def test_missing_token_is_401_envelope(client):
    resp = await client.get("/credits")
    assert resp.status_code == 401
    assert resp.json()["error"]["code"] == "unauthorized"
    assert resp.headers["www-authenticate"] == "Bearer"


async def test_validation_error_has_field_details(client, make_user):
    user = await make_user()
    resp = await client.get("/credits/ledger?limit=0", headers=user.headers)
    body = resp.json()
    assert resp.status_code == 422
    assert body["error"]["code"] == "validation_error"
    assert body["error"]["details"][0]["field"] == "query.limit"


async def test_unexpected_exception_is_generic_500(app, client, caplog):
    from fastapi import APIRouter

    router = APIRouter()

    @router.get("/__boom")
    async def boom():
        raise RuntimeError("secret internal detail")

    app.include_router(router)
    resp = await client.get("/__boom", headers={"x-request-id": "req-123"})
    body = resp.json()
    assert resp.status_code == 500
    assert body == {
        "success": False,
        "error": {"code": "internal_error", "message": "Something went wrong on our side. Please try again."},
        "request_id": "req-123",
    }
    assert "secret" not in resp.text
    assert "secret internal detail" in caplog.text


async def test_credits_balance_after_signup(client, make_user):
    user = await make_user()
    resp = await client.get("/credits", headers=user.headers)
    assert resp.status_code == 200
    assert resp.json() == {"success": True, "data": {"balance": 100}}
