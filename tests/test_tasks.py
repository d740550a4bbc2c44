"""POST /tasks and friends: validation, pricing, the one charge, idempotency, concurrency, cancel."""

import asyncio
import base64
import json
import time
import uuid

import httpx
import pytest

from lib.config import get_settings
from lib.tasks import TASK_PAGE
from tests.factories import (
    RoundTrips,
    balance,
    connect,
    ledger,
    make_asset,
    plan_as,
    set_balance,
    sql,
    storage_signings,
    task_row,
    token_expiry,
)


@pytest.fixture
def many_active(monkeypatch):
    monkeypatch.setenv("MAX_ACTIVE_TASKS_PER_USER", "1000")
    get_settings.cache_clear()
    yield
    monkeypatch.delenv("MAX_ACTIVE_TASKS_PER_USER")
    get_settings.cache_clear()


def upscale(asset_id: str, **params) -> dict:
    return {"model_key": "image.upscale", "params": {"image_asset_id": asset_id, "scale": 2, **params}}


async def test_create_task_charges_once_and_returns_201(client, make_user):
    user = await make_user()
    asset = make_asset(user.id, width=1000, height=1000)  # 2x → 4 MP → 4 credits
    resp = await client.post("/tasks", json=upscale(asset), headers=user.headers)
    assert resp.status_code == 201, resp.text
    task = resp.json()["data"]
    assert task["status"] == "queued" and task["cost"] == 4 and task["progress"] == 0
    assert '"progress":0.0' in resp.text  # a number of one type, as GET /tasks/{id} gives it
    assert task["params"]["image_asset_id"] == asset and task["model_key"] == "image.upscale"
    assert balance(user.id) == 96
    assert [e["kind"] for e in ledger(user.id, task["id"])] == ["charge"]


async def test_quote_matches_the_charge(client, make_user):
    user = await make_user()
    asset = make_asset(user.id, width=1000, height=1000)
    resp = await client.post(
        "/models/image.upscale/quote",
        json={"params": {"image_asset_id": asset, "scale": 4}, "input_asset_ids": [asset]},
        headers=user.headers,
    )
    assert resp.status_code == 200, resp.text
    assert resp.json()["data"]["credits"] == 16
    created = await client.post("/tasks", json=upscale(asset, scale=4), headers=user.headers)
    assert created.json()["data"]["cost"] == 16


async def test_models_lists_catalog_with_schemas(client):
    resp = await client.get("/models")
    assert resp.json()["data"]["next_cursor"] is None  # every list has the same shape
    models = {m["key"]: m for m in resp.json()["data"]["items"]}
    assert "image.upscale" in models and "media.probe" not in models
    schema = models["image.upscale"]["params_schema"]
    assert schema["properties"]["scale"]["enum"] == [2, 4]
    assert models["image.upscale"]["available"] is True


async def test_the_internal_probe_can_be_neither_run_nor_quoted(client, make_user):
    user = await make_user()
    params = {"asset_id": make_asset(user.id)}
    created = await client.post("/tasks", json={"model_key": "media.probe", "params": params}, headers=user.headers)
    assert created.status_code == 422, created.text
    assert created.json()["error"]["details"] == [{"field": "model_key", "message": "internal model"}]
    for key in ("media.probe", "no.such.model"):  # the model is the path's resource: one it does not list is a 404
        quoted = await client.post(f"/models/{key}/quote", json={"params": params}, headers=user.headers)
        assert quoted.status_code == 404 and "GET /models" in quoted.json()["error"]["message"]


@pytest.mark.parametrize(
    "params, field",
    [
        ({"scale": 3}, "params.scale"),
        ({"sharpen": 2}, "params.sharpen"),
        ({"sharpen": True}, "params.sharpen"),  # a client bug, not 1.0
        ({"sharpen": "0.5"}, "params.sharpen"),
        ({"format": "gif"}, "params.format"),
        ({"surprise": 1}, "params.surprise"),
    ],
)
async def test_bad_params_are_422_and_charge_nothing(client, make_user, params, field):
    user = await make_user()
    asset = make_asset(user.id)
    resp = await client.post("/tasks", json=upscale(asset, **params), headers=user.headers)
    body = resp.json()
    assert resp.status_code == 422
    assert body["error"]["code"] == "validation_error"
    assert field in [d["field"] for d in body["error"]["details"]]
    assert balance(user.id) == 100


async def test_unknown_model_and_output_pixel_limit_are_422(client, make_user):
    user = await make_user()
    huge = make_asset(user.id, width=6000, height=4000)  # 4x → 384 MP, over the limit
    resp = await client.post("/tasks", json=upscale(huge, scale=4), headers=user.headers)
    assert resp.status_code == 422 and "limit" in resp.json()["error"]["message"]
    resp = await client.post("/tasks", json={"model_key": "nope", "params": {}}, headers=user.headers)
    assert resp.status_code == 422
    assert balance(user.id) == 100


async def test_interpolating_a_video_over_the_output_limit_is_refused_before_charging(client, make_user):
    user = await make_user()
    huge = make_asset(user.id, kind="video", width=8000, height=4500, duration_s=2, fps=24)  # 36 MP in, and out
    body = {"model_key": "video.interpolate", "params": {"video_asset_id": huge}}
    resp = await client.post("/tasks", json=body, headers=user.headers)
    assert resp.status_code == 422 and "Choose a smaller input" in resp.json()["error"]["message"]
    assert balance(user.id) == 100


@pytest.mark.parametrize(("model", "params"), [("video.upscale", {"scale": 4}), ("video.interpolate", {})])
async def test_a_video_too_wide_for_h264_is_refused_before_charging(client, make_user, model, params):
    user = await make_user()
    strip = make_asset(user.id, kind="video", width=4200 if params else 16500, height=16, duration_s=2, fps=24)
    body = {"model_key": model, "params": {"video_asset_id": strip, **params}}
    resp = await client.post("/tasks", json=body, headers=user.headers)
    assert resp.status_code == 422, resp.text
    assert "16,384 pixels a side" in resp.json()["error"]["message"] and balance(user.id) == 100


@pytest.mark.parametrize(("duration", "fps", "credits"), [(2.01, 24, 4), (2.03, 24, 6), (4.01, 30, 8), (10, 30, 20)])
async def test_animate_is_priced_by_the_frames_it_renders(client, make_user, duration, fps, credits):
    """round(duration·fps) frames are rendered: 2.01 s at 24 fps is 48 frames, two seconds."""
    user = await make_user()
    params = {"image_asset_id": make_asset(user.id), "duration": duration, "fps": fps}
    resp = await client.post("/models/image.animate/quote", json={"params": params}, headers=user.headers)
    assert resp.json()["data"]["credits"] == credits


@pytest.mark.parametrize(("fmt", "refused"), [("webp", True), ("jpeg", False), ("png", False)])
async def test_an_image_too_wide_for_its_format_is_refused_before_charging(client, make_user, fmt, refused):
    user = await make_user()
    banner = make_asset(user.id, width=8200, height=100)  # 2x → 16,400 px wide: more than WebP holds
    resp = await client.post("/tasks", json=upscale(banner, scale=2, format=fmt), headers=user.headers)
    assert resp.status_code == (422 if refused else 201), resp.text
    if refused:
        assert resp.json()["error"]["details"] == [
            {"field": "params.format", "message": "output too large for this format"}
        ]
        assert balance(user.id) == 100


async def test_input_asset_rules(client, make_user):
    alice, bob = await make_user(), await make_user()
    theirs = make_asset(bob.id)
    pending = make_asset(alice.id, status="pending")
    video = make_asset(alice.id, kind="video", duration_s=2, fps=24)
    assert (await client.post("/tasks", json=upscale(theirs), headers=alice.headers)).status_code == 404
    assert (await client.post("/tasks", json=upscale(pending), headers=alice.headers)).status_code == 422
    wrong_kind = await client.post("/tasks", json=upscale(video), headers=alice.headers)
    assert wrong_kind.status_code == 422
    assert wrong_kind.json()["error"]["message"] == f"This model needs an image, but asset {video} is a video."
    assert balance(alice.id) == 100


async def test_insufficient_credits_is_402(client, make_user):
    user = await make_user()
    set_balance(user.id, 3)
    asset = make_asset(user.id, width=1000, height=1000)
    resp = await client.post("/tasks", json=upscale(asset), headers=user.headers)
    assert resp.status_code == 402
    assert resp.json()["error"]["code"] == "insufficient_credits"
    assert balance(user.id) == 3


async def test_too_many_active_tasks_is_429(client, make_user, monkeypatch):
    monkeypatch.setenv("MAX_ACTIVE_TASKS_PER_USER", "2")
    get_settings.cache_clear()
    try:
        user = await make_user()
        asset = make_asset(user.id)
        codes = [(await client.post("/tasks", json=upscale(asset), headers=user.headers)).status_code for _ in range(3)]
        assert codes == [201, 201, 429]
    finally:
        monkeypatch.delenv("MAX_ACTIVE_TASKS_PER_USER")
        get_settings.cache_clear()


async def test_fifty_concurrent_creates_for_ten_affordable(client, make_user, many_active):
    user = await make_user()
    asset = make_asset(user.id, width=2500, height=1000)  # 2x → 10 MP → 10 credits; balance 100
    responses = await asyncio.gather(
        *[client.post("/tasks", json=upscale(asset), headers=user.headers) for _ in range(50)]
    )
    codes = sorted(r.status_code for r in responses)
    assert codes.count(201) == 10 and codes.count(402) == 40, codes
    assert balance(user.id) == 0
    assert len(ledger(user.id)) == 1 + 10  # signup grant + ten charges


async def test_twenty_concurrent_replays_make_one_task(client, make_user, many_active):
    user = await make_user()
    asset = make_asset(user.id, width=1000, height=1000)
    headers = {**user.headers, "Idempotency-Key": "same-key"}
    responses = await asyncio.gather(*[client.post("/tasks", json=upscale(asset), headers=headers) for _ in range(20)])
    ids = {r.json()["data"]["id"] for r in responses}
    assert len(ids) == 1
    assert sorted(r.status_code for r in responses) == [200] * 19 + [201]
    assert balance(user.id) == 96


async def test_a_replay_after_its_input_and_project_were_deleted_returns_the_first_answer(client, make_user):
    user = await make_user()
    project = (await client.post("/projects", json={"name": "p"}, headers=user.headers)).json()["data"]["id"]
    asset = make_asset(user.id, width=1000, height=1000)
    body = {**upscale(asset), "project_id": project}
    headers = {**user.headers, "Idempotency-Key": "sent-twice"}
    first = await client.post("/tasks", json=body, headers=headers)
    assert first.status_code == 201
    sql("delete from public.assets where id = %s", (asset,))
    again = await client.post("/tasks", json=body, headers=headers)
    assert again.status_code == 200 and again.json()["data"]["id"] == first.json()["data"]["id"]
    assert (await client.delete(f"/projects/{project}", headers=user.headers)).status_code == 200
    again = await client.post("/tasks", json=body, headers=headers)
    assert again.status_code == 200 and again.json()["data"]["id"] == first.json()["data"]["id"]
    other = await client.post("/tasks", json={**body, "params": {**body["params"], "scale": 4}}, headers=headers)
    assert other.status_code == 409
    assert (await client.post("/tasks", json=body, headers=user.headers)).status_code == 404  # no key: no replay
    assert balance(user.id) == 96


async def test_a_key_first_used_without_a_project_is_409_with_one(client, make_user):
    user, other = await make_user(), await make_user()
    theirs = (await client.post("/projects", json={"name": "theirs"}, headers=other.headers)).json()["data"]["id"]
    asset = make_asset(user.id, width=1000, height=1000)
    headers = {**user.headers, "Idempotency-Key": "no-project"}
    first = await client.post("/tasks", json=upscale(asset), headers=headers)
    assert first.status_code == 201
    for project in (theirs, str(uuid.uuid4())):
        resp = await client.post("/tasks", json={**upscale(asset), "project_id": project}, headers=headers)
        assert resp.status_code == 409, resp.text
    task = (await client.get(f"/tasks/{first.json()['data']['id']}", headers=user.headers)).json()["data"]
    assert task["project_id"] is None and balance(user.id) == 96


async def test_a_replay_signs_the_result_afresh(client, make_user):
    user = await make_user()
    asset = make_asset(user.id, width=1000, height=1000)
    headers = {**user.headers, "Idempotency-Key": "finished"}
    task = (await client.post("/tasks", json=upscale(asset), headers=headers)).json()["data"]
    sql(
        "update public.tasks set status = 'completed', progress = 1, result = %s, result_url = 'http://stale.example/x'"
        " where id = %s",
        (json.dumps({"path": f"{user.id}/tasks/{task['id']}/1/gone.png"}), task["id"]),
    )
    fresh = (await client.get(f"/tasks/{task['id']}", headers=user.headers)).json()["data"]["result_url"]
    again = (await client.post("/tasks", json=upscale(asset), headers=headers)).json()["data"]
    assert again["result_url"] == fresh != "http://stale.example/x"
    sql("delete from public.assets where id = %s", (asset,))  # the replay that finds its input deleted
    again = (await client.post("/tasks", json=upscale(asset), headers=headers)).json()["data"]
    assert again["result_url"] == fresh


async def test_a_replay_that_todays_limits_would_refuse_returns_the_first_answer(client, make_user, monkeypatch):
    user = await make_user()
    asset = make_asset(user.id, width=1000, height=1000)
    headers = {**user.headers, "Idempotency-Key": "before-the-limit"}
    first = await client.post("/tasks", json=upscale(asset), headers=headers)
    assert first.status_code == 201
    monkeypatch.setattr(get_settings(), "max_output_pixels", 1000 * 1000)  # lowered since: 2x is now too large
    again = await client.post("/tasks", json=upscale(asset), headers=headers)
    assert again.status_code == 200 and again.json()["data"]["id"] == first.json()["data"]["id"]
    assert (await client.post("/tasks", json=upscale(asset), headers=user.headers)).status_code == 422
    other = await client.post("/tasks", json=upscale(asset, scale=4), headers=headers)
    assert other.status_code == 409  # still not a way around the limit for another request
    assert balance(user.id) == 96


async def test_a_key_reused_for_a_different_request_is_409_and_charges_nothing(client, make_user):
    user = await make_user()
    asset = make_asset(user.id, width=1000, height=1000)  # 2x: 4 credits
    headers = {**user.headers, "Idempotency-Key": "reused"}
    assert (await client.post("/tasks", json=upscale(asset), headers=headers)).status_code == 201
    for body in (upscale(asset, scale=4), upscale(make_asset(user.id))):
        resp = await client.post("/tasks", json=body, headers=headers)
        assert resp.status_code == 409 and "different request" in resp.json()["error"]["message"]
    assert (await client.post("/tasks", json=upscale(asset), headers=headers)).status_code == 200  # a true replay
    assert balance(user.id) == 96


async def test_openapi_documents_the_replays_200_as_the_same_task(client):
    """A client generated from the schema reads a replay's task: an undocumented 200 left it without one."""
    schema = (await client.get("/openapi.json")).json()
    answers = schema["paths"]["/tasks"]["post"]["responses"]
    for status in ("201", "200"):
        ref = answers[status]["content"]["application/json"]["schema"]["$ref"]
        assert ref.endswith("/Envelope_TaskPublic_"), status


@pytest.mark.parametrize("key", ["probe:00000000-0000-0000-0000-000000000000", "a\x00b", "tab\there", ""])
async def test_reserved_or_unstorable_idempotency_keys_are_422(client, make_user, key):
    user = await make_user()
    headers = {**user.headers, "Idempotency-Key": key}
    resp = await client.post("/tasks", json=upscale(make_asset(user.id)), headers=headers)
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"]["details"][0]["field"] == "header.Idempotency-Key"  # as the header's other errors
    if not key.startswith("probe:"):  # checkout keys have no reserved prefix
        resp = await client.post("/billing/checkout", json={"package_id": "starter"}, headers=headers)
        assert resp.status_code == 422, resp.text
    assert balance(user.id) == 100


async def test_an_idempotency_key_sent_twice_is_422(client, make_user):
    user = await make_user()
    headers = [*user.headers.items(), ("Idempotency-Key", "first"), ("Idempotency-Key", "second")]
    for path, body in (("/tasks", upscale(make_asset(user.id))), ("/billing/checkout", {"package_id": "starter"})):
        resp = await client.post(path, json=body, headers=headers)
        assert resp.status_code == 422, resp.text
        detail = {"field": "header.Idempotency-Key", "message": "given more than once"}
        assert resp.json()["error"]["details"] == [detail]
    assert balance(user.id) == 100
    assert sql("select count(*) from public.tasks where user_id = %s", (user.id,))[0]["count"] == 0


async def test_a_quote_for_an_unavailable_provider_is_503_like_the_task(client, make_user, monkeypatch):
    from lib.config import get_settings

    monkeypatch.setattr(get_settings(), "kling_ai_access_key", None)
    user = await make_user()
    body = {"params": {"prompt": "a cat"}}
    resp = await client.post("/models/kling.text2video/quote", json=body, headers=user.headers)
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "provider_unavailable"


async def test_other_users_task_is_404(client, make_user):
    alice, bob = await make_user(), await make_user()
    task = (await client.post("/tasks", json=upscale(make_asset(alice.id)), headers=alice.headers)).json()["data"]
    for method, path in [("GET", f"/tasks/{task['id']}"), ("POST", f"/tasks/{task['id']}/cancel")]:
        resp = await client.request(method, path, headers=bob.headers)
        assert resp.status_code == 404 and resp.json()["error"]["code"] == "not_found"
    listed = (await client.get("/tasks", headers=bob.headers)).json()["data"]["items"]
    assert listed == []
    assert task_row(task["id"])["status"] == "queued"


async def test_cancel_queued_refunds_once_and_a_retried_cancel_answers_the_same(client, make_user):
    """取消排队任务退款一次；重试的取消（上次回答丢了）照样回答已取消的任务，不再退款"""
    user = await make_user()
    task = (await client.post("/tasks", json=upscale(make_asset(user.id)), headers=user.headers)).json()["data"]
    resp = await client.post(f"/tasks/{task['id']}/cancel", headers=user.headers)
    assert resp.status_code == 200 and resp.json()["data"]["status"] == "canceled"
    again = await client.post(f"/tasks/{task['id']}/cancel", headers=user.headers)
    assert again.status_code == 200 and again.json()["data"] == resp.json()["data"]
    assert [e["kind"] for e in ledger(user.id, task["id"])] == ["charge", "refund"]
    assert balance(user.id) == 100


async def test_two_cancels_at_once_both_answer_the_canceled_task_and_refund_once(client, make_user):
    """同时两次取消：都回答已取消的任务，只退款一次"""
    user = await make_user()
    task = (await client.post("/tasks", json=upscale(make_asset(user.id)), headers=user.headers)).json()["data"]
    answers = await asyncio.gather(
        *(client.post(f"/tasks/{task['id']}/cancel", headers=user.headers) for _ in range(2))
    )
    assert [(a.status_code, a.json()["data"]["status"]) for a in answers] == [(200, "canceled")] * 2
    assert [e["kind"] for e in ledger(user.id, task["id"])] == ["charge", "refund"]
    assert balance(user.id) == 100


async def test_list_filters_and_cursor(client, make_user, many_active):
    user = await make_user()
    asset = make_asset(user.id)
    created = [
        (await client.post("/tasks", json=upscale(asset), headers=user.headers)).json()["data"]["id"] for _ in range(5)
    ]
    await client.post(f"/tasks/{created[0]}/cancel", headers=user.headers)
    seen, cursor = [], None
    while True:
        page = (
            await client.get(
                "/tasks", params={"limit": 2, **({"cursor": cursor} if cursor else {})}, headers=user.headers
            )
        ).json()["data"]
        seen += [t["id"] for t in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == list(reversed(created))
    canceled = (await client.get("/tasks?status=canceled", headers=user.headers)).json()["data"]["items"]
    assert [t["id"] for t in canceled] == [created[0]]
    assert (await client.get("/tasks?status=bogus", headers=user.headers)).status_code == 422
    bad_cursor = await client.get("/tasks?cursor=%%%", headers=user.headers)
    assert bad_cursor.status_code == 422 and bad_cursor.json()["error"]["details"][0]["field"] == "query.cursor"


async def test_ledger_is_newest_first_with_cursor(client, make_user):
    user = await make_user()
    await client.post("/tasks", json=upscale(make_asset(user.id)), headers=user.headers)
    page = (await client.get("/credits/ledger?limit=1", headers=user.headers)).json()["data"]
    assert page["items"][0]["kind"] == "charge" and page["next_cursor"]
    rest = (await client.get(f"/credits/ledger?cursor={page['next_cursor']}", headers=user.headers)).json()["data"]
    assert [e["kind"] for e in rest["items"]] == ["grant"] and rest["next_cursor"] is None


CRAFTED_CURSORS = [[1], "abc", 7, {"id": "x"}, {"id": 10**30}, {"id": True}, {"created_at": 1}]


class RawJSON(str):
    """已是 JSON 文本的游标内容"""


NESTED_JSON = RawJSON("[" * 3000)  # deeper than json.loads can go


@pytest.mark.parametrize("value", [*CRAFTED_CURSORS, {"created_at": "2020-01-01", "id": 5.5}, NESTED_JSON])
@pytest.mark.parametrize("path", ["/credits/ledger", "/tasks", "/projects", "/assets"])
async def test_crafted_cursors_are_refused(client, make_user, path, value):
    user = await make_user()
    text = value if isinstance(value, RawJSON) else json.dumps(value)
    cursor = base64.urlsafe_b64encode(text.encode()).decode()
    resp = await client.get(path, params={"cursor": cursor}, headers=user.headers)
    assert resp.status_code == 422 and resp.json()["error"]["code"] == "validation_error"


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/projects", {"name": "a\x00b"}, "name"),
        ("/projects", {"name": "a", "description": "\x00"}, "description"),
        ("/assets/uploads", {"content_type": "image/png", "bytes": 10, "filename": "a\x00.png"}, "filename"),
        ("/assets/uploads", {"content_type": "image/png", "bytes": 10, "filename": "clip\ud83d.png"}, "filename"),
        ("/billing/checkout", {"package_id": "star\x00ter"}, "package_id"),
        ("/models/kling.text2video/quote", {"params": {"prompt": "a cat\x00"}}, "params.prompt"),
    ],
)
async def test_text_postgres_cannot_store_is_refused_as_input(client, make_user, path, body, field, monkeypatch):
    from lib.config import get_settings

    if "kling" in path:  # quoted only while Kling is configured
        monkeypatch.setattr(get_settings(), "kling_ai_access_key", "ak-test")
        monkeypatch.setattr(get_settings(), "kling_ai_secret_key", "sk-test")
    user = await make_user()
    headers = {**user.headers, "content-type": "application/json"}
    resp = await client.post(path, content=json.dumps(body), headers=headers)  # escaped: a lone surrogate too
    assert resp.status_code == 422, resp.text
    assert field in [d["field"] for d in resp.json()["error"]["details"]]


@pytest.mark.parametrize(
    ("path", "body", "field", "says"),
    [
        (
            "/assets/uploads",
            {"content_type": "image/png", "bytes": 10, "filename": "a" * 256},
            "filename",
            "at most 255",
        ),
        ("/billing/checkout", {"package_id": ""}, "package_id", "at least 1"),
        ("/billing/checkout", {"package_id": "starter", "cancel_url": "h" * 2049}, "cancel_url", "at most 2048"),
        ("/models/kling.text2video/quote", {"params": {"prompt": "a" * 2501}}, "params.prompt", "at most 2500"),
        ("/models/kling.text2video/quote", {"params": {"prompt": "  "}}, "params.prompt", "at least 1"),
        (
            "/models/kling.text2video/quote",
            {"params": {"prompt": "a", "negative_prompt": "b" * 2501}},
            "params.negative_prompt",
            "at most 2500",
        ),
        ("/billing/checkout/" + "c" * 256, None, "path.session_id", "at most 255"),
    ],
)
async def test_text_of_the_wrong_length_is_told_in_characters(client, make_user, path, body, field, says, monkeypatch):
    """A too long prompt or file name is "String should have at most N characters", not "items after validation"."""
    from lib.config import get_settings

    monkeypatch.setattr(get_settings(), "kling_ai_access_key", "ak-test")
    monkeypatch.setattr(get_settings(), "kling_ai_secret_key", "sk-test")
    user = await make_user()
    if body is None:
        resp = await client.get(path, headers=user.headers)
    else:
        resp = await client.post(path, json=body, headers=user.headers)
    assert resp.status_code == 422, resp.text
    [message] = [d["message"] for d in resp.json()["error"]["details"] if d["field"] == field]
    assert message.startswith("String should have") and says in message and "character" in message, message


async def test_video_above_60_fps_is_billed_per_60_frames(client, make_user):
    """The GPU's work is per frame: a 1 s clip of 3000 frames is not one second's price."""
    user = await make_user()
    normal = make_asset(user.id, kind="video", width=64, height=48, duration_s=1, fps=30)
    slow_motion = make_asset(user.id, kind="video", width=64, height=48, duration_s=1, fps=240)
    packed = make_asset(user.id, kind="video", width=64, height=48, duration_s=1, fps=3000)

    async def quote(asset: str) -> int:
        body = {"params": {"video_asset_id": asset, "scale": 4}}
        resp = await client.post("/models/video.upscale/quote", json=body, headers=user.headers)
        return resp.json()["data"]["credits"]

    assert [await quote(a) for a in (normal, slow_motion, packed)] == [6, 6 * 4, 6 * 50]


@pytest.mark.parametrize(
    ("path", "query", "field"),
    [
        ("/tasks", "status=queued&status=processing", "status"),
        ("/tasks", "limit=5&limit=50", "limit"),
        ("/projects", "limit=3&limit=4", "limit"),
        ("/projects", "cursor=&cursor=", "cursor"),
        ("/credits/ledger", "limit=1&limit=2", "limit"),
        ("/assets", "kind=image&kind=video", "kind"),
    ],
)
async def test_a_query_parameter_given_twice_is_422_not_the_last_value(client, make_user, path, query, field):
    """?status=queued&status=processing does not filter by both: it is refused, not read as the last one."""
    user = await make_user()
    resp = await client.get(f"{path}?{query}", headers=user.headers)
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"]["details"] == [{"field": f"query.{field}", "message": "given more than once"}]
    once = await client.get(f"{path}?{query.split('&')[0]}&other=1&other=2", headers=user.headers)
    assert once.status_code == 200, once.text  # once is fine; a parameter the route does not take is ignored


async def test_a_list_parameter_may_be_given_many_times():
    """列表型查询参数本就可以给多次：只有单值参数给两次才是 422"""
    import httpx
    from fastapi import Depends, FastAPI, Query

    from functions.errors import install_error_handlers
    from functions.query import given_once

    app = FastAPI(dependencies=[Depends(given_once)])
    install_error_handlers(app)

    @app.get("/items")
    async def items(ids: list[str] = Query([]), limit: int = 10):
        return {"ids": ids, "limit": limit}

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
        many = await http.get("/items?ids=a&ids=b")
        twice = await http.get("/items?ids=a&limit=1&limit=2")
    assert many.json() == {"ids": ["a", "b"], "limit": 10}
    assert twice.status_code == 422 and twice.json()["error"]["details"][0]["field"] == "query.limit"


@pytest.mark.parametrize("where", ["params", "body"])
async def test_a_body_full_of_unknown_fields_is_one_error_not_one_per_field(client, make_user, where):
    """Tens of thousands of unknown fields in a 1 MiB body: one detail, not a 5 MB answer listing each."""
    user = await make_user()
    asset = make_asset(user.id)
    unknown = {f"k{i}": 0 for i in range(70_000)}
    body = {**upscale(asset), **unknown} if where == "body" else upscale(asset, **unknown)
    resp = await client.post("/tasks", json=body, headers=user.headers)
    assert resp.status_code == 422, resp.text[:300]
    field = "params" if where == "params" else "body"
    assert resp.json()["error"]["details"] == [{"field": field, "message": "70,000 fields it does not take"}]
    project = await client.post("/projects", json={"name": "p", **unknown}, headers=user.headers)
    assert project.status_code == 422
    assert project.json()["error"]["details"] == [{"field": "body", "message": "70,000 fields it does not take"}]
    few = await client.post("/tasks", json=upscale(asset, a=1, b=2), headers=user.headers)  # a typo or two: named
    assert {d["field"] for d in few.json()["error"]["details"]} == {"params.a", "params.b"}
    assert balance(user.id) == 100


async def test_a_cancel_that_committed_answers_200_and_stops_the_call_it_names(client, make_user, monkeypatch):
    """The call to stop comes with the canceled row: no second read that a database blip could turn into a 503."""
    import psycopg

    from lib import tasks as tasks_module

    user = await make_user()
    task = (await client.post("/tasks", json=upscale(make_asset(user.id)), headers=user.headers)).json()["data"]
    sql("update public.tasks set call_id = 'fc-running' where id = %s", (task["id"],))
    stopped = []

    class Dispatcher:
        async def cancel(self, *, task_id, call_id, terminate=True):
            stopped.append(call_id)

    real_fetch_one = tasks_module.db.fetch_one

    async def blip_after_the_cancel(query, *args, **kwargs):
        if task_row(task["id"])["status"] == "canceled":
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        return await real_fetch_one(query, *args, **kwargs)

    monkeypatch.setattr(tasks_module, "get_dispatcher", lambda: Dispatcher())
    monkeypatch.setattr(tasks_module.db, "fetch_one", blip_after_the_cancel)
    resp = await client.post(f"/tasks/{task['id']}/cancel", headers=user.headers)
    assert resp.status_code == 200, resp.text
    assert resp.json()["data"]["status"] == "canceled" and stopped == ["fc-running"]
    assert [e["kind"] for e in ledger(user.id, task["id"])] == ["charge", "refund"]


@pytest.fixture
async def database_in_kolkata(monkeypatch):
    """API 的数据库连接使用非 UTC 的会话时区（数据库的默认时区被改过，或本地 initdb 取了机器的时区）"""
    from lib import db

    await db.close_pool()
    monkeypatch.setenv("PGTZ", "Asia/Kolkata")  # libpq sends it as the session's TimeZone
    yield
    await db.close_pool()  # the next test's pool opens after monkeypatch has removed PGTZ


async def test_times_are_utc_whatever_the_databases_time_zone(client, make_user, database_in_kolkata):
    user = await make_user()
    created = await client.post("/tasks", json=upscale(make_asset(user.id)), headers=user.headers)
    task = created.json()["data"]
    read = (await client.get(f"/tasks/{task['id']}", headers=user.headers)).json()["data"]
    canceled = (await client.post(f"/tasks/{task['id']}/cancel", headers=user.headers)).json()["data"]
    entry = (await client.get("/credits/ledger", headers=user.headers)).json()["data"]["items"][0]
    times = [task["created_at"], read["created_at"], canceled["finished_at"], entry["created_at"]]
    assert all(t.endswith("Z") for t in times), times
    assert task["created_at"] == read["created_at"]


async def test_creating_a_task_in_a_project_is_two_round_trips(client, make_user, monkeypatch, tmp_path):
    """POST /tasks：输入资源与项目一次读取（以用户身份），扣费与建任务一次 SQL 调用"""
    user = await make_user()
    asset = make_asset(user.id, width=1000, height=1000)
    project = (await client.post("/projects", json={"name": "p"}, headers=user.headers)).json()["data"]["id"]
    round_trips = RoundTrips(monkeypatch, tmp_path)
    resp = await client.post("/tasks", json={**upscale(asset), "project_id": project}, headers=user.headers)
    assert resp.status_code == 201, resp.text
    assert round_trips.count == 2
    assert round_trips.statements[-1].startswith("select public.create_task(")
    round_trips.clear()
    gone = str(uuid.uuid4())
    resp = await client.post("/tasks", json={**upscale(asset), "project_id": gone}, headers=user.headers)
    assert resp.status_code == 404 and resp.json()["error"]["message"] == "Project not found."
    assert round_trips.count == 1  # refused before anything is charged


async def test_the_active_task_limit_and_the_active_list_read_only_the_callers_active_tasks(make_user):
    """创建任务时的活跃任务计数与 queued/processing 列表只读调用者的活跃任务（不读其全部历史或所有人的）"""
    user = await make_user()
    sql(
        "with u as (insert into auth.users (id, email) select gen_random_uuid(), gen_random_uuid() || '@example.com'"
        " from generate_series(1, 500) returning id)"
        " insert into public.tasks (user_id, model_key, params, status, cost)"
        " select u.id, 'image.upscale', '{}', case when n = 1 then 'queued' else 'completed' end, 1"
        " from u, generate_series(1, 40) n"
    )
    sql(
        "insert into public.tasks (user_id, model_key, params, status, cost)"
        " select %s, 'image.upscale', '{}', case when n <= 2 then 'queued' else 'completed' end, 1"
        " from generate_series(1, 3000) n",
        (user.id,),
    )
    sql("analyze public.tasks")
    with connect() as conn, conn.transaction():
        conn.execute("select public.create_task(%s, 'image.upscale', '{}', 0, null, null, '{}', 100)", (user.id,))
        read = conn.execute(
            "select c.relname, pg_stat_get_xact_tuples_returned(c.oid) as n from pg_index i"
            " join pg_class c on c.oid = i.indexrelid"
            " where i.indrelid = 'public.tasks'::regclass and pg_stat_get_xact_numscans(c.oid) > 0"
        ).fetchall()
    assert read == [{"relname": "tasks_user_active_idx", "n": 2}]  # its two queued tasks, nothing else
    params = {"status": "queued", "project": None, "at": None, "id": None, "limit": 21}
    assert "tasks_user_active_idx" in plan_as(user.id, TASK_PAGE, params)


async def completed_with_result(client, user) -> tuple[dict, str]:
    """一个已完成、结果文件与资源行都在的任务；返回 (任务, 结果资源 id)"""
    from lib.storage import get_storage

    task = (await client.post("/tasks", json=upscale(make_asset(user.id)), headers=user.headers)).json()["data"]
    path = f"{user.id}/tasks/{task['id']}/1/result-0.png"
    result_asset = make_asset(user.id, path=path)
    await get_storage().upload_bytes(path=path, data=b"result", content_type="image/png")
    sql(
        "update public.tasks set status = 'completed', progress = 1, result = %s where id = %s",
        (json.dumps({"asset_id": result_asset, "path": path}), task["id"]),
    )
    return task, result_asset


async def test_polling_a_completed_task_signs_its_result_once(client, make_user):
    user = await make_user()
    task, _ = await completed_with_result(client, user)
    with storage_signings() as signings:
        urls = []
        for _ in range(2):
            urls.append((await client.get(f"/tasks/{task['id']}", headers=user.headers)).json()["data"]["result_url"])
            [listed] = (await client.get("/tasks", headers=user.headers)).json()["data"]["items"]
            urls.append(listed["result_url"])
    assert len(set(urls)) == 1 and len(signings) == 1
    assert token_expiry(urls[0]) >= time.time() + get_settings().signed_url_seconds - 1
    async with httpx.AsyncClient() as http:
        assert (await http.get(urls[0])).content == b"result"


async def test_a_result_deleted_by_another_api_process_reads_as_null_at_once(client, make_user):
    user = await make_user()
    task, result_asset = await completed_with_result(client, user)
    assert (await client.get(f"/tasks/{task['id']}", headers=user.headers)).json()["data"]["result_url"]
    # Another container's DELETE /assets/{id}: the file and the row go, this process is not told.
    [row] = sql("delete from public.assets where id = %s returning path", (result_asset,))
    key = get_settings().supabase_service_role_key
    async with httpx.AsyncClient() as http:
        resp = await http.request(
            "DELETE",
            f"{get_settings().supabase_url}/storage/v1/object/media",
            json={"prefixes": [row["path"]]},
            headers={"apikey": key, "Authorization": f"Bearer {key}"},
        )
        assert resp.status_code == 200, resp.text
    assert (await client.get(f"/tasks/{task['id']}", headers=user.headers)).json()["data"]["result_url"] is None
    [listed] = (await client.get("/tasks", headers=user.headers)).json()["data"]["items"]
    assert listed["id"] == task["id"] and listed["result_url"] is None


async def test_a_page_of_tasks_looks_up_only_its_own_results(client, make_user):
    user = await make_user()
    sql(
        "insert into public.assets (user_id, kind, bucket, path, mime, status, created_at)"
        " select %s, 'image', 'media', %s || '/uploads/' || gen_random_uuid() || '.png', 'image/png', 'ready',"
        " now() - make_interval(secs => n) from generate_series(1, 3000) n",
        (user.id, user.id),
    )
    sql(
        "insert into public.tasks (user_id, model_key, params, status, cost, result, created_at)"
        " select user_id, 'image.upscale', '{}', 'completed', 1, jsonb_build_object('asset_id', id, 'path', path),"
        " created_at from public.assets where user_id = %s",
        (user.id,),
    )
    sql("analyze public.tasks, public.assets")
    params = {"status": None, "project": None, "at": None, "id": None, "limit": 21}
    plan = plan_as(user.id, TASK_PAGE, params)
    # One primary-key probe per task on the page, never a scan of the user's 3,000 assets.
    assert "assets_pkey" in plan and "Seq Scan on assets" not in plan, plan
