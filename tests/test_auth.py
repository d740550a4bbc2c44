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
        "not valid yet": es256(claims(nbf=int(time.time()) + 600)),
        "no expiry": es256({k: v for k, v in claims().items() if k != "exp"}),
        "no audience": es256({k: v for k, v in claims().items() if k != "aud"}),
        "no issuer": es256({k: v for k, v in claims().items() if k != "iss"}),
        "no subject": es256({k: v for k, v in claims().items() if k != "sub"}),
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


async def test_dev_users_refuse_a_field_they_do_not_take(client):
    resp = await client.post("/dev/users", json={"email": "a@example.com", "password": "secret"})
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"]["details"] == [{"field": "password", "message": "Extra inputs are not permitted"}]


async def test_dev_users_answer_this_machine_only(app):
    """SPOOL_HOST=0.0.0.0 时局域网也能连上：本地签发令牌只给本机（它能为任何邮箱签发）"""
    import httpx

    transport = httpx.ASGITransport(app=app, client=("192.168.1.23", 50000))
    async with httpx.AsyncClient(transport=transport, base_url="http://spool.test") as lan:
        resp = await lan.post("/dev/users", json={"email": "someone@example.com"})
    assert resp.status_code == 403
    assert "lib.local token" in resp.json()["error"]["message"]


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
    exp = int(time.time()) + 3
    token = es256(claims(sub=user.id, exp=exp))
    assert (await balance_status(client, token))[0] == 200
    assert (await balance_status(client, token))[0] == 200  # remembered
    await asyncio.sleep(exp - time.time() + 0.2)
    status, body = await balance_status(client, token)
    assert status == 401 and body["error"]["message"] == "Access token expired."


async def test_a_token_whose_expiry_is_not_a_number_is_refused_every_time(client, make_user):
    """exp 写成字符串："Invalid access token."（以前第一次通过，记住后再来时比较时间出错：500）"""
    user = await make_user()
    token = es256(claims(sub=user.id, exp=str(int(time.time()) + 600)))
    for _ in range(2):
        status, body = await balance_status(client, token)
        assert status == 401, body
        assert body["error"]["message"] == "Invalid access token."


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
    paid = await client.get("/billing/checkout/cs_test_before_the_deletion", headers=user.headers)
    reads = [await client.get(path, headers=user.headers) for path in READS_OF(user)]
    for resp in (created, ticket, balance, task, pay, paid, *reads):
        assert resp.status_code == 401, resp.text
        assert resp.json()["error"]["message"] == "This account no longer exists."


class JwksServer:
    """A stand-in for the project's JWKS endpoint: its answer, latency and fetch count are the test's to set."""

    def __init__(self):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.status, self.body, self.delay, self.fetches = 200, json.dumps(local_issuer().jwks()).encode(), 0.0, 0
        self.answering = threading.Event()  # cleared: a fetch waits to answer until the test sets it again
        self.answering.set()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                outer.fetches += 1
                time.sleep(outer.delay)
                outer.answering.wait(60)
                self.send_response(outer.status)
                self.send_header("content-type", "application/json" if outer.body[:1] == b"{" else "text/html")
                self.send_header("content-length", str(len(outer.body)))
                self.end_headers()
                self.wfile.write(outer.body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/auth/v1/.well-known/jwks.json"

    def fail(self, status: int = 503, body: bytes = b"<html>down</html>") -> None:
        self.status, self.body = status, body


@pytest.fixture
def jwks_server():
    """令牌校验器改从可控的 JWKS 服务器取密钥"""
    import threading

    from lib.auth import SigningKeys, get_token_verifier

    server = JwksServer()
    threading.Thread(target=server.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    reset_token_verifier()
    get_token_verifier().keys = SigningKeys(server.url, lifespan=600)
    yield server
    server.answering.set()
    server.server.shutdown()
    reset_token_verifier()


async def test_an_unknown_kid_is_looked_up_off_the_event_loop(jwks_server):
    """A rotated-in (or forged) kid makes the verifier fetch the JWKS again: the loop keeps serving meanwhile."""
    import asyncio

    from lib.auth import JWKS_COOLDOWN_SECONDS, get_token_verifier
    from lib.errors import Unauthorized

    verifier = get_token_verifier()
    await verifier.averify(es256(claims()))  # the first fetch warms the cache
    jwks_server.delay = 0.5  # a slow identity provider
    verifier.keys._fetched_at -= JWKS_COOLDOWN_SECONDS  # past the cooldown after a fetch

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
    assert jwks_server.fetches == 2
    assert (await verifier.averify(es256(claims())))["aud"] == "authenticated"  # known kid: no fetch
    assert jwks_server.fetches == 2


async def test_forged_kids_refetch_at_most_once_per_cooldown(jwks_server):
    from lib.auth import get_token_verifier
    from lib.errors import Unauthorized

    verifier = get_token_verifier()
    await verifier.averify(es256(claims()))
    other_key = ec.generate_private_key(ec.SECP256R1())
    for n in range(5):
        with pytest.raises(Unauthorized):
            await verifier.averify(es256(claims(), key=other_key, kid=f"forged-{n}"))
    assert jwks_server.fetches == 1


@pytest.mark.parametrize("answer", [(503, b"<html>down</html>"), (200, b"<html>a web app</html>"), (200, b"[]")])
async def test_signing_keys_out_of_reach_is_503_not_401(client, make_user, jwks_server, answer):
    """取不到签名密钥是我们这边的暂时故障：503 + Retry-After（401 会让客户端登出用户）"""
    user = await make_user()
    jwks_server.fail(*answer)
    resp = await client.get("/credits", headers={"Authorization": f"Bearer {es256(claims(sub=user.id))}"})
    assert resp.status_code == 503, resp.text
    assert resp.json()["error"]["code"] == "service_unavailable"
    assert resp.headers["retry-after"] == "5"


async def test_known_keys_outlive_their_cache_while_the_jwks_is_down(client, make_user, jwks_server):
    from lib.auth import get_token_verifier

    user = await make_user()
    assert (await balance_status(client, es256(claims(sub=user.id))))[0] == 200
    jwks_server.fail()
    get_token_verifier().keys._fetched_at -= 601  # the cached key set has expired
    status, body = await balance_status(client, es256(claims(sub=user.id, iat=int(time.time()) - 1)))
    assert status == 200, body
    assert jwks_server.fetches == 2  # it tried
    status, _ = await balance_status(client, es256(claims(sub=user.id, iat=int(time.time()) - 2)))
    assert status == 200 and jwks_server.fetches == 2  # and does not try again at once


async def test_an_outage_costs_one_fetch_not_one_per_request(client, make_user, jwks_server, monkeypatch):
    """JWKS 挂起时并发请求不排队各等一次超时：等同一次获取的结果，之后几秒内直接回答"""
    import asyncio

    import lib.auth

    monkeypatch.setattr(lib.auth, "JWKS_RETRY_SECONDS", 0.3)  # shorter than the failing fetch itself
    user = await make_user()
    jwks_server.fail()
    jwks_server.delay = 0.5
    tokens = [es256(claims(sub=user.id, iat=int(time.time()) - n)) for n in range(4)]
    answers = await asyncio.gather(*(balance_status(client, token) for token in tokens))
    assert [status for status, _ in answers] == [503] * 4
    assert jwks_server.fetches == 1


async def test_an_expired_remembered_token_is_refused_without_a_fetch(client, make_user, jwks_server, monkeypatch):
    import asyncio

    import lib.auth

    monkeypatch.setattr(lib.auth, "LEEWAY_SECONDS", 0)
    user = await make_user()
    exp = int(time.time()) + 3
    token = es256(claims(sub=user.id, exp=exp))
    assert (await balance_status(client, token))[0] == 200
    await asyncio.sleep(exp - time.time() + 0.2)
    lib.auth.get_token_verifier().keys._fetched_at -= 601  # the key set has expired too (a tab waking up)
    status, body = await balance_status(client, token)
    assert status == 401 and body["error"]["message"] == "Access token expired."
    assert jwks_server.fetches == 1


@pytest.mark.parametrize(
    "overrides",
    [{"role": "anon"}, {"role": "service_role"}, {"role": None}, {"sub": "urn:uuid:{uuid}"}, {"sub": "{{{uuid}}}"}],
)
async def test_only_a_signed_in_users_token_with_a_plain_uuid_passes(client, make_user, overrides):
    user = await make_user()
    payload = claims(sub=user.id)
    for name, value in overrides.items():
        if value is None:
            del payload[name]
        else:
            payload[name] = value.format(uuid=user.id) if isinstance(value, str) else value
    status, body = await balance_status(client, es256(payload))
    assert status == 401, body
    assert body["error"]["code"] == "unauthorized"


def test_jwks_cache_seconds_must_be_positive(monkeypatch):
    from pydantic import ValidationError

    from lib.config import Settings

    monkeypatch.setenv("JWKS_CACHE_SECONDS", "0")
    with pytest.raises(ValidationError):
        Settings()


async def test_a_known_key_answers_at_once_while_its_stale_key_set_is_fetched_again(client, make_user, jwks_server):
    """密钥集过期后重新获取时（身份服务慢或挂起），已知 kid 的请求不排队等它：沿用已有的密钥"""
    import asyncio

    from lib.auth import get_token_verifier

    user = await make_user()
    assert (await balance_status(client, es256(claims(sub=user.id))))[0] == 200
    get_token_verifier().keys._fetched_at -= 601  # the cached key set has expired
    jwks_server.answering.clear()  # a slow identity provider: this fetch answers only when the test lets it
    fetching = asyncio.create_task(balance_status(client, es256(claims(sub=user.id, iat=int(time.time()) - 1))))
    while jwks_server.fetches < 2:
        await asyncio.sleep(0.01)
    try:
        other = await asyncio.wait_for(balance_status(client, es256(claims(sub=user.id, iat=int(time.time()) - 2))), 30)
        assert other[0] == 200 and not fetching.done()
    finally:
        jwks_server.answering.set()
    assert (await fetching)[0] == 200
    assert jwks_server.fetches == 2


async def test_a_revoked_signing_key_stops_the_tokens_it_signed_though_remembered(client, make_user, jwks_server):
    """项目撤销（泄露的）签名密钥后，密钥集一刷新，用它签的令牌即被拒绝，即使之前验证过并被记住"""
    from jwt.algorithms import ECAlgorithm

    from lib.auth import get_token_verifier

    user = await make_user()
    leaked = ec.generate_private_key(ec.SECP256R1())
    jwk = {**json.loads(ECAlgorithm.to_jwk(leaked.public_key())), "kid": "leaked", "alg": "ES256", "use": "sig"}
    jwks_server.body = json.dumps({"keys": [*local_issuer().jwks()["keys"], jwk]}).encode()
    forged = es256(claims(sub=user.id, exp=int(time.time()) + 365 * 86400), key=leaked, kid="leaked")
    assert (await balance_status(client, forged))[0] == 200  # remembered from now on
    jwks_server.body = json.dumps(local_issuer().jwks()).encode()  # the project revokes the key
    get_token_verifier().keys._fetched_at -= 601  # and the cached key set runs out
    status, body = await balance_status(client, forged)
    assert status == 401, body
    assert jwks_server.fetches == 2
    assert (await balance_status(client, es256(claims(sub=user.id))))[0] == 200  # the key still listed still signs
