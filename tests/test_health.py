"""Health, the response envelopes and the request id."""

import re

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


async def test_unknown_body_fields_are_refused_not_ignored(client, make_user):
    user = await make_user()
    project = (await client.post("/projects", json={"name": "a"}, headers=user.headers)).json()["data"]
    resp = await client.patch(f"/projects/{project['id']}", json={"nmae": "b"}, headers=user.headers)
    assert resp.status_code == 422 and resp.json()["error"]["details"][0]["field"] == "nmae"
    resp = await client.post(
        "/tasks", json={"model_key": "image.upscale", "projectId": project["id"]}, headers=user.headers
    )
    assert resp.status_code == 422 and resp.json()["error"]["details"][0]["field"] == "projectId"
    resp = await client.patch(f"/projects/{project['id']}", json={"name": None}, headers=user.headers)
    assert resp.status_code == 422  # a name may be left out, never cleared


async def test_bodies_that_are_not_json_say_so(client, make_user):
    user = await make_user()
    resp = await client.post(
        "/projects", content=b'{"name": ', headers={**user.headers, "content-type": "application/json"}
    )
    assert resp.status_code == 422
    [detail] = resp.json()["error"]["details"]
    assert detail["field"] == "body" and "at character" in detail["message"]
    resp = await client.post(
        "/projects", content=b'{"name": "a"}', headers={**user.headers, "content-type": "text/plain"}
    )
    assert resp.status_code == 415 and resp.json()["error"]["code"] == "unsupported_media_type"


@pytest.mark.parametrize(
    "body",
    [b'{"name": "\xff\xfe"}', b"[" * 100_000, b'{"name": "a", "n": ' + b"9" * 5000 + b"}"],
    ids=["invalid-utf8", "nested-too-deep", "huge-integer"],
)
async def test_json_the_parser_gives_up_on_is_a_validation_error(client, make_user, body):
    user = await make_user()
    resp = await client.post("/projects", content=body, headers={**user.headers, "content-type": "application/json"})
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"]["code"] == "validation_error"
    assert resp.json()["error"]["details"][0]["field"] == "body"


@pytest.mark.parametrize("content_type", ["text/json", "text/x-json", "application/jsonl"])
async def test_a_json_body_under_a_type_that_is_not_json_is_415(client, make_user, content_type):
    """Only application/json and application/*+json bodies are read as JSON: another type is named, not the body."""
    user = await make_user()
    headers = {**user.headers, "content-type": content_type}
    resp = await client.post("/projects", content=b'{"name": "a"}', headers=headers)
    assert resp.status_code == 415 and resp.json()["error"]["code"] == "unsupported_media_type"


async def test_a_body_without_a_content_type_is_415(client, make_user):
    """Not a validation error on a body that is valid JSON: what is missing is its type."""
    user = await make_user()
    resp = await client.post("/projects", content=b'{"name": "a"}', headers=user.headers)
    assert resp.status_code == 415 and resp.json()["error"]["code"] == "unsupported_media_type"


async def test_head_answers_as_get_without_a_body(client, make_user):
    resp = await client.head("/health")
    assert resp.status_code == 200 and resp.content == b"" and resp.headers["x-request-id"]
    assert (await client.head("/credits")).status_code == 401
    user = await make_user()
    assert (await client.head("/credits", headers=user.headers)).status_code == 200


async def test_method_not_allowed_names_every_method_of_the_path(client, make_user):
    user = await make_user()
    resp = await client.put("/projects/00000000-0000-0000-0000-000000000000", headers=user.headers)
    assert resp.status_code == 405 and resp.json()["error"]["code"] == "method_not_allowed"
    assert resp.headers["allow"] == "DELETE, GET, HEAD, PATCH"
    assert (await client.put("/projects", headers=user.headers)).headers["allow"] == "GET, HEAD, POST"


async def test_a_trailing_slash_is_a_404_envelope_not_a_redirect(client, make_user):
    user = await make_user()
    resp = await client.post("/projects/", json={"name": "a"}, headers=user.headers)
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "not_found"


async def test_openapi_declares_the_bearer_token_and_the_error_envelope(client):
    schema = (await client.get("/openapi.json")).json()
    [(name, scheme)] = schema["components"]["securitySchemes"].items()
    assert scheme == {"type": "http", "scheme": "bearer", "description": scheme["description"]}
    assert schema["paths"]["/tasks"]["get"]["security"] == [{name: []}]
    assert "security" not in schema["paths"]["/models"]["get"]  # the catalog is public
    errors = schema["paths"]["/tasks"]["post"]["responses"]["4XX"]
    assert errors["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorEnvelope")
    assert "HTTPValidationError" not in schema["components"]["schemas"]  # a body this API never sends
    name_schema = schema["components"]["schemas"]["ProjectUpdate"]["properties"]["name"]
    assert name_schema["type"] == "string"  # not nullable
    for path, method in (("/tasks", "get"), ("/tasks", "post"), ("/credits/ledger", "get"), ("/models", "get")):
        ok_schema = schema["paths"][path][method]["responses"]["201" if method == "post" else "200"]
        assert ok_schema["content"]["application/json"]["schema"]["$ref"].split("/")[-1].startswith("Envelope_")
    for path, methods in schema["paths"].items():  # the local stand-ins' routes too (POST /dev/users)
        for method, operation in methods.items():
            answers = [(s, a) for s, a in operation["responses"].items() if s.startswith("2")]
            assert answers, (method, path)
            for status, answer in answers:  # POST /tasks has two: 201 and a replay's 200
                ref = answer["content"]["application/json"]["schema"].get("$ref", "")
                assert ref.split("/")[-1].startswith("Envelope_"), (method, path, status)
    page = schema["components"]["schemas"]["TaskPage"]["properties"]["items"]["items"]["$ref"]
    assert page.endswith("/TaskPublic")  # a client generator gets typed tasks, not `any`


def _components_under(schema: dict, name: str, seen: set) -> None:
    """name 及其引用到的所有组件"""
    if name not in seen:
        seen.add(name)
        for other in re.findall(r"#/components/schemas/(\w+)", str(schema["components"]["schemas"][name])):
            _components_under(schema, other, seen)


async def test_openapi_marks_what_every_answer_always_carries_as_required(client, make_user):
    """A client generated from the schema can tell success from error by `success`, and gets no optional fields
    that every answer carries (`download_url`, `next_cursor`)."""
    schema = (await client.get("/openapi.json")).json()
    names: set = set()
    for methods in schema["paths"].values():
        for operation in methods.values():
            for answer in operation["responses"].values():
                ref = answer.get("content", {}).get("application/json", {}).get("schema", {}).get("$ref")
                if ref:
                    _components_under(schema, ref.split("/")[-1], names)
    components = schema["components"]["schemas"]
    for name in names - {"ErrorBody"}:  # an error's `details` is left out when there are none
        component = components[name]
        assert set(component.get("required", [])) == set(component["properties"]), name
    assert components["Envelope_TaskPublic_"]["properties"]["success"]["const"] is True
    assert components["ErrorEnvelope"]["properties"]["success"]["const"] is False
    # The health check's 503 carries its status for monitors: the schema says so.
    down = schema["paths"]["/health"]["get"]["responses"]["503"]["content"]["application/json"]["schema"]
    assert "data" in components[down["$ref"].split("/")[-1]]["required"]

    user = await make_user()
    answers = [
        (await client.get("/assets", headers=user.headers)).json(),
        (await client.get("/models")).json(),
        (await client.get("/credits/packages", headers=user.headers)).json(),
        (await client.get("/tasks/0", headers=user.headers)).json(),
    ]
    assert [answer["success"] for answer in answers] == [True, True, True, False]
    assert all("next_cursor" in answer["data"] for answer in answers[:3])


async def test_timestamps_have_one_format_everywhere(client, make_user):
    user = await make_user()
    await client.post("/projects", json={"name": "a"}, headers=user.headers)
    project = (await client.get("/projects", headers=user.headers)).json()["data"]["items"][0]
    ledger = (await client.get("/credits/ledger", headers=user.headers)).json()["data"]["items"][0]
    assert project["created_at"].endswith("Z") and ledger["created_at"].endswith("Z")


async def test_a_filter_sent_empty_filters_nothing(client, make_user):
    user = await make_user()
    for url in ("/tasks?status=&project_id=", "/assets?project_id=&kind=&status=&cursor="):
        resp = await client.get(url, headers=user.headers)
        assert resp.status_code == 200, (url, resp.text)
    assert (await client.get("/tasks?status=done", headers=user.headers)).status_code == 422


async def test_a_page_size_sent_empty_is_the_default_one(client, make_user):
    """A page size the page left blank (`?limit=`) is the default, as a blank filter or cursor is no filter."""
    user = await make_user()
    for n in range(3):
        await client.post("/projects", json={"name": f"p{n}"}, headers=user.headers)
    for url in ("/tasks?limit=", "/assets?limit=&cursor=", "/projects?limit=", "/credits/ledger?limit="):
        resp = await client.get(url, headers=user.headers)
        assert resp.status_code == 200, (url, resp.text)
    assert len((await client.get("/projects?limit=", headers=user.headers)).json()["data"]["items"]) == 3
    for url in ("/projects?limit=0", "/projects?limit=abc", "/projects?limit=&limit=2"):
        resp = await client.get(url, headers=user.headers)
        assert resp.status_code == 422 and resp.json()["error"]["details"][0]["field"] == "query.limit", url
    schema = (await client.get("/openapi.json")).json()
    [limit] = [p for p in schema["paths"]["/credits/ledger"]["get"]["parameters"] if p["name"] == "limit"]
    assert limit["schema"] == {"type": "integer", "minimum": 1, "maximum": 200, "default": 50, "title": "Limit"}


async def test_unexpected_exception_is_generic_500(app, client, caplog):
    from fastapi import APIRouter

    router = APIRouter()

    @router.get("/__boom")
    async def boom():
        raise RuntimeError("secret internal detail")

    app.include_router(router, include_in_schema=False)  # the app is the session's: keep it out of later schemas
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


async def test_a_browser_can_read_the_retry_and_auth_headers(client):
    resp = await client.get("/credits", headers={"origin": "http://localhost:3000"})
    assert resp.status_code == 401 and resp.headers["www-authenticate"] == "Bearer"
    exposed = {h.strip() for h in resp.headers["access-control-expose-headers"].lower().split(",")}
    assert {"x-request-id", "retry-after", "www-authenticate", "allow"} <= exposed


@pytest.mark.parametrize("incoming", ["caf\u00e9", "\u65e5\u672c"])
async def test_a_request_id_that_is_not_ascii_is_replaced(client, incoming):
    resp = await client.get("/health", headers=[(b"x-request-id", incoming.encode())])
    rid = resp.headers["x-request-id"]
    assert rid.isascii() and rid != incoming.encode().decode("latin-1")


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


async def test_a_database_out_of_connections_is_a_503_to_retry_not_a_500(client, make_user, monkeypatch, caplog):
    from contextlib import AsyncExitStack

    from lib import db

    user = await make_user()
    pool = await db.get_pool()
    monkeypatch.setattr(pool, "timeout", 0.2)  # DB_WAIT_SECONDS, shortened
    async with AsyncExitStack() as held:
        for _ in range(pool.max_size):
            await held.enter_async_context(pool.connection())
        resp = await client.get("/credits", headers=user.headers)
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "service_unavailable"
    assert resp.headers["retry-after"] == "5" and resp.json()["request_id"]
    assert not [r for r in caplog.records if r.exc_info]  # expected trouble: a warning, no traceback
    assert (await client.get("/credits", headers=user.headers)).status_code == 200


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


async def test_every_answer_is_logged_with_its_request_id(client, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="spool.access")
    resp = await client.get("/no-such-route")
    [line] = [r.getMessage() for r in caplog.records if r.name == "spool.access"]
    assert line.startswith("GET /no-such-route 404 ") and line.endswith(f"request {resp.json()['request_id']}")


@pytest.mark.parametrize(
    "configured", ["https://app.example.com/", "HTTPS://App.Example.com:443", "https://app.example.com"]
)
async def test_cors_origins_are_matched_as_the_browser_writes_its_origin(monkeypatch, configured):
    """A trailing slash or a default port in CORS_ORIGINS (BILLING_ALLOWED_ORIGINS takes them) still admits the app."""
    import httpx

    from functions.app import create_app
    from lib.config import get_settings

    monkeypatch.setattr(get_settings(), "cors_origins", [configured])
    transport = httpx.ASGITransport(app=create_app(), raise_app_exceptions=False)
    origin = {"origin": "https://app.example.com"}
    async with httpx.AsyncClient(transport=transport, base_url="http://spool.test") as client:
        preflight = await client.options("/tasks", headers={**origin, "access-control-request-method": "POST"})
        assert preflight.status_code == 200, preflight.text
        resp = await client.get("/no-such-route", headers=origin)
    assert preflight.headers["access-control-allow-origin"] == "https://app.example.com"
    assert resp.headers["access-control-allow-origin"] == "https://app.example.com"


async def test_a_refused_preflight_is_an_envelope_in_the_access_log(client, caplog):
    """An origin missing from CORS_ORIGINS: the refusal says so in the envelope, and the logs show it."""
    import logging

    caplog.set_level(logging.INFO, logger="spool.access")
    preflight = {"origin": "https://app.elsewhere.example", "access-control-request-method": "POST"}
    resp = await client.options("/tasks", headers=preflight)
    assert resp.status_code == 400
    body = resp.json()
    assert body["success"] is False and body["error"]["code"] == "bad_request"
    assert "origin" in body["error"]["message"] and "CORS_ORIGINS" in body["error"]["message"]
    assert body["request_id"] == resp.headers["x-request-id"]
    [line] = [r.getMessage() for r in caplog.records if r.name == "spool.access"]
    assert line.startswith("OPTIONS /tasks 400 ") and line.endswith(f"request {body['request_id']}")
    allowed = await client.options("/tasks", headers={**preflight, "origin": "http://localhost:3000"})
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == "http://localhost:3000"
    assert allowed.headers["x-request-id"]


@pytest.mark.parametrize(
    ("path", "content_type", "first_part"),
    [
        ("/assets", "multipart/form-data; boundary=b", b'--b\r\ncontent-disposition: form-data; name="file"\r\n\r\n'),
        ("/projects", "application/json", b'{"name": '),
    ],
    ids=["upload", "json"],
)
async def test_a_client_gone_mid_request_is_no_server_error(app, make_user, caplog, path, content_type, first_part):
    """A closed tab or a dropped upload: logged as the client's doing (499), not as a 500 with a traceback."""
    import logging

    user = await make_user()
    caplog.set_level(logging.INFO)
    messages = [{"type": "http.request", "body": first_part, "more_body": True}]

    async def receive():  # the connection drops after the first part of the body
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    sent = []

    async def send(message):
        sent.append(message)

    headers = [(b"content-type", content_type.encode()), (b"authorization", f"Bearer {user.token}".encode())]
    scope = {"type": "http", "method": "POST", "path": path, "raw_path": path.encode(), "query_string": b"",
             "headers": headers, "http_version": "1.1", "scheme": "http", "server": ("spool.test", 80),
             "client": ("127.0.0.1", 5000), "root_path": ""}  # fmt: skip
    await app(scope, receive, send)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    [line] = [r.getMessage() for r in caplog.records if r.name == "spool.access"]
    assert line.startswith(f"POST {path} 499 "), line
