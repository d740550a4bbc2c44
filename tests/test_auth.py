"""Access tokens: what passes and what is refused with 401 unauthorized."""

import base64
import json
import time
import uuid

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from lib.auth import reset_token_verifier
from lib.config import get_settings
from lib.local.stack import local_issuer
from tests.factories import sql

HS_SECRET = "super-secret-jwt-token-with-at-least-32-characters-long"


def claims(**overrides) -> dict:
    now = int(time.time())
    base = {
        "sub": str(uuid.uuid4()),
        "aud": "authenticated",
        "iss": get_settings().auth_issuer,
        "role": "authenticated",
        "iat": now,
        "exp": now + 600,
    }
    return {**base, **overrides}


def es256(payload: dict, *, key=None, kid: str | None = None) -> str:
    issuer = local_issuer()
    return jwt.encode(payload, key or issuer.private_key, algorithm="ES256", headers={"kid": kid or issuer.kid})


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


@pytest.fixture
def hs256_enabled(monkeypatch):
    monkeypatch.setenv("SUPABASE_JWT_SECRET", HS_SECRET)
    get_settings.cache_clear()
    reset_token_verifier()
    yield
    monkeypatch.delenv("SUPABASE_JWT_SECRET")
    get_settings.cache_clear()
    reset_token_verifier()


async def balance_status(client, token: str) -> tuple[int, dict]:
    resp = await client.get("/credits", headers={"Authorization": f"Bearer {token}"})
    return resp.status_code, resp.json()


async def test_valid_es256_token_via_jwks(client, make_user):
    user = await make_user()
    status, body = await balance_status(client, es256(claims(sub=user.id)))
    assert status == 200 and body["data"]["balance"] == 100


async def test_valid_hs256_token(client, make_user, hs256_enabled):
    user = await make_user()
    token = jwt.encode(claims(sub=user.id), HS_SECRET, algorithm="HS256")
    status, _ = await balance_status(client, token)
    assert status == 200


def _forged_tokens() -> dict[str, str]:
    other_key = ec.generate_private_key(ec.SECP256R1())
    good = es256(claims())
    header, _payload, signature = good.split(".")
    tampered_payload = b64(json.dumps({**claims(), "sub": str(uuid.uuid4())}).encode())
    public_pem = (
        local_issuer()
        .private_key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    none_header = b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    rs256_header = b64(json.dumps({"alg": "RS256", "typ": "JWT", "kid": local_issuer().kid}).encode())
    hs_with_public_key = ".".join(
        [
            b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": local_issuer().kid}).encode()),
            b64(json.dumps(claims()).encode()),
        ]
    )
    import hashlib
    import hmac

    mac = hmac.new(public_pem, hs_with_public_key.encode(), hashlib.sha256).digest()
    return {
        "expired": es256(claims(exp=int(time.time()) - 3600, iat=int(time.time()) - 7200)),
        "wrong audience": es256(claims(aud="anon")),
        "wrong issuer": es256(claims(iss="https://evil.example.com/auth/v1")),
        "tampered payload": f"{header}.{tampered_payload}.{signature}",
        "alg none": f"{none_header}.{b64(json.dumps(claims()).encode())}.",
        "hs256 signed with the public key": f"{hs_with_public_key}.{b64(mac)}",
        "rs256 header on the ec key": f"{rs256_header}.{good.split('.', 1)[1]}",
        "unknown kid": es256(claims(), key=other_key, kid="not-a-known-kid"),
        "signed by another key": es256(claims(), key=other_key),
        "subject not a uuid": es256(claims(sub="admin")),
        "garbage": "not.a.token",
    }


@pytest.mark.parametrize("case", list(_forged_tokens()))
async def test_bad_tokens_are_refused(client, case):
    token = _forged_tokens()[case]
    status, body = await balance_status(client, token)
    assert status == 401, case
    assert body["success"] is False
    assert body["error"]["code"] == "unauthorized"


async def test_hs256_refused_when_no_secret_configured(client):
    token = jwt.encode(claims(), HS_SECRET, algorithm="HS256")
    status, _ = await balance_status(client, token)
    assert status == 401


@pytest.mark.parametrize("header", ["", "Bearer", "Bearer ", "Basic abc", "Token x.y.z"])
async def test_missing_or_malformed_header(client, header):
    resp = await client.get("/credits", headers={"Authorization": header} if header else {})
    assert resp.status_code == 401
    assert resp.json()["error"]["code"] == "unauthorized"


async def test_dev_users_returns_same_user_for_same_email(client):
    first = (await client.post("/dev/users", json={"email": "Same@Example.com"})).json()["data"]
    second = (await client.post("/dev/users", json={"email": "same@example.com"})).json()["data"]
    assert first["user_id"] == second["user_id"]
    assert (await client.post("/dev/users", json={"email": "not-an-email"})).status_code == 422


async def test_dev_users_absent_from_the_product_app(postgres):
    """产品应用（云模式所用）不含本地替身：/dev/users 为 404"""
    import httpx

    from functions.app import create_app

    transport = httpx.ASGITransport(app=create_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://cloud.test") as cloud:
        assert (await cloud.post("/dev/users", json={"email": "a@example.com"})).status_code == 404
        assert (await cloud.get("/auth/v1/.well-known/jwks.json")).status_code == 404


async def test_a_remembered_token_still_expires(client, make_user, monkeypatch):
    import asyncio

    import lib.auth

    monkeypatch.setattr(lib.auth, "LEEWAY_SECONDS", 0)
    user = await make_user()
    token = es256(claims(sub=user.id, exp=int(time.time()) + 1))
    assert (await balance_status(client, token))[0] == 200
    assert (await balance_status(client, token))[0] == 200  # remembered
    await asyncio.sleep(2.1)
    status, body = await balance_status(client, token)
    assert status == 401 and body["error"]["message"] == "Access token expired."


def READS_OF(user) -> list[str]:
    """用户能读的每一种东西（列表与单个）"""
    mine = str(uuid.uuid4())
    return [
        "/projects",
        f"/projects/{mine}",
        "/tasks",
        f"/tasks/{mine}",
        "/assets",
        f"/assets/{mine}",
        "/credits/ledger",
        "/credits/packages",
    ]


async def test_a_deleted_users_token_is_401_everywhere(client, make_user, monkeypatch):
    user = await make_user()
    sql("delete from auth.users where id = %s", (user.id,))
    created = await client.post("/projects", json={"name": "a"}, headers=user.headers)
    upload = {"content_type": "image/png", "bytes": 10}
    ticket = await client.post("/assets/uploads", json=upload, headers=user.headers)
    balance = await client.get("/credits", headers=user.headers)
    monkeypatch.setattr(get_settings(), "kling_ai_access_key", "ak-test")  # a model without input files
    monkeypatch.setattr(get_settings(), "kling_ai_secret_key", "sk-test")
    task = await client.post(
        "/tasks", json={"model_key": "kling.text2video", "params": {"prompt": "a cat"}}, headers=user.headers
    )
    pay = await client.post("/billing/checkout", json={"package_id": "starter"}, headers=user.headers)
    reads = [await client.get(path, headers=user.headers) for path in READS_OF(user)]
    for resp in (created, ticket, balance, task, pay, *reads):
        assert resp.status_code == 401, resp.text
        assert resp.json()["error"]["message"] == "This account no longer exists."


async def test_an_unknown_kid_is_looked_up_off_the_event_loop(live_server):
    """A rotated-in (or forged) kid makes the verifier fetch the JWKS again: the loop keeps serving meanwhile."""
    import asyncio
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from jwt import PyJWKClient

    from lib.auth import TokenVerifier
    from lib.errors import Unauthorized

    body = json.dumps(local_issuer().jwks()).encode()

    class SlowJwks(BaseHTTPRequestHandler):
        def do_GET(self):
            time.sleep(0.5)  # a slow identity provider
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), SlowJwks)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        verifier = TokenVerifier()
        url = f"http://127.0.0.1:{server.server_port}/jwks.json"
        verifier.jwks = PyJWKClient(url, cache_jwk_set=True, lifespan=600, timeout=5, cooldown_duration=0)
        await verifier.averify(es256(claims()))  # the first fetch warms the cache

        ticks = 0

        async def tick():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.create_task(tick())
        other_key = ec.generate_private_key(ec.SECP256R1())
        with pytest.raises(Unauthorized):
            await verifier.averify(es256(claims(), key=other_key, kid="rotated-in"))
        seen_while_fetching = ticks
        ticker.cancel()
        assert seen_while_fetching > 0
        assert (await verifier.averify(es256(claims())))["aud"] == "authenticated"  # known kid: no fetch
    finally:
        server.shutdown()
