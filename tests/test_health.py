"""Health, the response envelopes and the request id."""

import pytest


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
    resp = await client.get("/__boom", headers={"x-request-id": "req-123", "origin": "http://localhost:3000"})
    body = resp.json()
    assert resp.status_code == 500
    assert resp.headers["access-control-allow-origin"] == "http://localhost:3000"  # the web app can read it
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


async def test_health_without_the_database_is_503_in_the_error_envelope(client, monkeypatch):
    import functions.health

    async def down() -> bool:
        return False

    monkeypatch.setattr(functions.health, "check_database", down)
    resp = await client.get("/health")
    body = resp.json()
    assert resp.status_code == 503 and body["success"] is False
    assert body["error"]["code"] == "service_unavailable"
    assert body["data"] == {"status": "degraded", "db": "unavailable"}


@pytest.mark.parametrize("chunked", [False, True])
async def test_a_body_over_the_limit_is_413_before_it_is_read_whole(client, make_user, chunked):
    from functions.limits import MAX_BODY_BYTES

    user = await make_user()
    body = b'{"name": "a", "pad": "' + b"x" * MAX_BODY_BYTES + b'"}'

    async def chunks():
        for start in range(0, len(body), 65536):
            yield body[start : start + 65536]

    headers = {**user.headers, "content-type": "application/json"}
    resp = await client.post("/projects", content=chunks() if chunked else body, headers=headers)
    assert resp.status_code == 413, resp.text
    assert resp.json()["error"]["code"] == "payload_too_large"
    assert resp.json()["request_id"] == resp.headers["x-request-id"] != "-"
    assert (await client.get("/projects", headers=user.headers)).json()["data"]["items"] == []


def test_the_local_server_refuses_cloud_mode(monkeypatch):
    from lib.config import get_settings
    from lib.local.server import create_local_app

    monkeypatch.setattr(get_settings(), "spool_mode", "cloud")
    with pytest.raises(RuntimeError, match="SPOOL_MODE=local"):
        create_local_app()
