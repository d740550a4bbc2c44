"""Assets: direct and signed uploads, typing by bytes, the probe task, reads with signed URLs, deletes, isolation."""

from __future__ import annotations

import asyncio
import io
import uuid

import httpx
import pytest
from PIL import Image

from lib import assets
from lib.assets import get_asset_service
from lib.config import get_settings
from lib.errors import Forbidden
from lib.media_types import sniff
from lib.storage import get_storage
from tests.factories import balance, connect, make_asset, sql, storage_signings, task_row


def png_bytes(width: int = 8, height: int = 6) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


async def direct_upload(client, user, data: bytes, name: str = "a.png", **form) -> httpx.Response:
    return await client.post("/assets", files={"file": (name, data, "image/png")}, data=form, headers=user.headers)


def storage_path_of(user, asset_id: str) -> str:
    """删除账号后行已不在：按上传的命名规则推出路径"""
    return f"{user.id}/uploads/{asset_id}.png"


def storage_path(asset_id: str) -> str:
    return sql("select path from public.assets where id = %s", (asset_id,))[0]["path"]


async def test_direct_upload_is_pending_with_a_free_probe_task(client, make_user):
    user = await make_user()
    data = png_bytes()
    resp = await direct_upload(client, user, data, "holiday.png")
    assert resp.status_code == 201, resp.text
    asset = resp.json()["data"]
    assert asset["status"] == "pending" and asset["kind"] == "image" and asset["mime"] == "image/png"
    assert asset["bytes"] == len(data) and asset["metadata"] == {"filename": "holiday.png"}
    assert asset["download_url"] is None and "path" not in asset

    task = task_row(asset["probe_task_id"])
    assert task["model_key"] == "media.probe" and task["cost"] == 0 and task["status"] == "queued"
    assert task["params"] == {"asset_id": asset["id"]} and [str(i) for i in task["input_asset_ids"]] == [asset["id"]]
    assert task["idempotency_key"] == f"probe:{asset['id']}"
    assert balance(user.id) == 100

    path = storage_path(asset["id"])
    assert path == f"{user.id}/uploads/{asset['id']}.png"
    info = await get_storage().info(path=path, user_id=user.id)
    assert info["size"] == len(data) and info["content_type"] == "image/png"


async def test_a_direct_upload_refuses_a_form_field_it_does_not_take(client, make_user):
    user = await make_user()
    resp = await direct_upload(client, user, png_bytes(), projectId=str(uuid.uuid4()))  # project_id misspelt
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"]["details"] == [{"field": "projectId", "message": "Extra inputs are not permitted"}]
    assert sql("select id from public.assets where user_id = %s", (user.id,)) == []


async def test_reads_name_the_uploads_check_as_the_upload_did(client, make_user):
    user = await make_user()
    uploaded = (await direct_upload(client, user, png_bytes())).json()["data"]
    other = make_asset(user.id)  # a row no upload check made (a task's result, say)

    one = (await client.get(f"/assets/{uploaded['id']}", headers=user.headers)).json()["data"]
    assert one["status"] == "pending" and one["probe_task_id"] == uploaded["probe_task_id"]
    listed = {a["id"]: a for a in (await client.get("/assets", headers=user.headers)).json()["data"]["items"]}
    assert listed[uploaded["id"]]["probe_task_id"] == uploaded["probe_task_id"]
    assert listed[other]["probe_task_id"] is None


async def test_a_direct_upload_larger_than_the_forms_memory_is_stored_whole(client, make_user, tmp_path):
    """超过 1 MB 的表单文件在磁盘上：从那里流式存入存储，内容一字不差"""
    user = await make_user()
    data = png_bytes() + bytes(range(256)) * (3 * 4096)  # 3 MB behind a PNG's header
    resp = await direct_upload(client, user, data)
    assert resp.status_code == 201, resp.text
    asset = resp.json()["data"]
    assert asset["bytes"] == len(data)
    copy = tmp_path / "stored"
    await get_storage().download_to(path=storage_path(asset["id"]), dest=copy)
    assert copy.read_bytes() == data


async def test_a_form_filename_is_kept_as_a_storable_label(client, make_user):
    user = await make_user()
    name = b"hol\0iday" + b"y" * 300 + b".png"  # a raw NUL, as a hand-made form can send it
    part = b'--b\r\ncontent-disposition: form-data; name="file"; filename="' + name + b'"\r\n\r\n'
    headers = {**user.headers, "content-type": "multipart/form-data; boundary=b"}
    resp = await client.post("/assets", content=part + png_bytes() + b"\r\n--b--\r\n", headers=headers)
    assert resp.status_code == 201, resp.text
    assert resp.json()["data"]["metadata"]["filename"] == "holiday" + "y" * 248


async def test_signed_upload_then_complete_then_probed(client, make_user):
    user = await make_user()
    data = png_bytes(40, 30)
    resp = await client.post(
        "/assets/uploads",
        json={"content_type": "image/png", "bytes": len(data), "filename": "big.png"},
        headers=user.headers,
    )
    assert resp.status_code == 201, resp.text
    ticket = resp.json()["data"]
    assert set(ticket) == {"asset_id", "upload_url", "token", "expires_at", "bucket", "path", "resumable_url"}
    storage_url = f"{get_settings().supabase_url}/storage/v1"
    assert ticket["upload_url"].startswith(f"{storage_url}/object/upload/sign/media/{ticket['path']}?token=")
    assert ticket["bucket"] == "media" and ticket["path"] == f"{user.id}/uploads/{ticket['asset_id']}.png"
    assert ticket["resumable_url"] == f"{storage_url}/upload/resumable/sign"

    early = await client.post(f"/assets/{ticket['asset_id']}/complete", headers=user.headers)
    assert early.status_code == 409 and early.json()["error"]["code"] == "conflict"

    async with httpx.AsyncClient() as http:
        put = await http.put(ticket["upload_url"], content=data, headers={"content-type": "image/png"})
    assert put.status_code == 200, put.text

    done = await client.post(f"/assets/{ticket['asset_id']}/complete", headers=user.headers)
    assert done.status_code == 200, done.text
    asset = done.json()["data"]
    assert asset["status"] == "pending" and asset["bytes"] == len(data) and asset["probe_task_id"]
    again = (await client.post(f"/assets/{ticket['asset_id']}/complete", headers=user.headers)).json()["data"]
    assert again["probe_task_id"] == asset["probe_task_id"]  # idempotent: one probe task
    assert len(sql("select id from public.tasks where user_id = %s", (user.id,))) == 1

    probe = {
        "kind": "image",
        "format": "png",
        "mime": "image/png",
        "width": 40,
        "height": 30,
        "duration_s": None,
        "fps": None,
        "frame_count": 1,
        "bytes": len(data),
    }
    await get_asset_service().mark_probed(asset_id=asset["id"], probe=probe, reason=None)
    ready = (await client.get(f"/assets/{asset['id']}", headers=user.headers)).json()["data"]
    assert ready["status"] == "ready" and (ready["width"], ready["height"]) == (40, 30)
    expires = ticket["expires_at"]  # as every time the API gives: UTC, ending in Z
    assert ready["metadata"] == {"filename": "big.png", "format": "png", "frame_count": 1, "upload_expires_at": expires}
    async with httpx.AsyncClient() as http:
        assert (await http.get(ready["download_url"])).content == data
    late = await client.post(f"/assets/{asset['id']}/complete", headers=user.headers)
    assert late.status_code == 409


async def test_upload_ticket_validation(client, make_user, monkeypatch):
    user = await make_user()
    resp = await client.post("/assets/uploads", json={"content_type": "text/plain", "bytes": 10}, headers=user.headers)
    assert resp.status_code == 422 and resp.json()["error"]["details"][0]["field"] == "content_type"
    for size in (True, "10", 10.0):  # a size is a JSON integer
        resp = await client.post(
            "/assets/uploads", json={"content_type": "video/mp4", "bytes": size}, headers=user.headers
        )
        assert resp.status_code == 422 and resp.json()["error"]["details"][0]["field"] == "bytes", size
    monkeypatch.setattr(get_settings(), "max_upload_bytes", 1000)
    resp = await client.post("/assets/uploads", json={"content_type": "video/mp4", "bytes": 1001}, headers=user.headers)
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "payload_too_large"
    resp = await client.post(
        "/assets/uploads",
        json={"content_type": "video/mp4", "bytes": 10, "project_id": str(uuid.uuid4())},
        headers=user.headers,
    )
    assert resp.status_code == 404


@pytest.mark.parametrize(
    ("declared", "head", "ext", "mime"),
    [
        ("video/avi", b"RIFF\0\0\0\0AVI LIST", ".avi", "video/x-msvideo"),  # Windows' and macOS's name for AVI
        ("video/x-m4v", b"\0\0\0\x18ftypM4V ", ".mp4", "video/mp4"),  # Safari's for an .m4v (MP4) file
        ("image/jpg", b"\xff\xd8\xff\xe0", ".jpg", "image/jpeg"),
    ],
)
async def test_a_file_named_by_another_common_type_is_taken_for_what_it_is(
    client, make_user, declared, head, ext, mime
):
    """浏览器给的类型名不止一种（file.type 来自操作系统）：常见的别名照收，签名上传后 complete 也不拒"""
    user = await make_user()
    data = head + b"\0" * 64
    resp = await client.post(
        "/assets/uploads", json={"content_type": declared, "bytes": len(data)}, headers=user.headers
    )
    assert resp.status_code == 201, resp.text
    ticket = resp.json()["data"]
    assert ticket["path"].endswith(ext)
    async with httpx.AsyncClient() as http:
        put = await http.put(ticket["upload_url"], content=data, headers={"content-type": declared})
    assert put.status_code == 200, put.text
    done = await client.post(f"/assets/{ticket['asset_id']}/complete", headers=user.headers)
    assert done.status_code == 200, done.text
    assert (done.json()["data"]["status"], done.json()["data"]["mime"]) == ("pending", mime)


@pytest.mark.parametrize(
    ("declared", "filename", "ext"),
    [
        ("", "holiday.MKV", ".mkv"),
        ("application/octet-stream", "clip.m4v", ".mp4"),
        ("", "scan.jpeg", ".jpg"),
        ("binary/octet-stream", "take.mkv", ".mkv"),  # an S3-minded client's name for no type, sent with the file too
    ],
)
async def test_a_file_the_browser_gives_no_type_is_known_by_its_name(client, make_user, declared, filename, ext):
    """浏览器不认识的扩展名 file.type 为空（macOS 上的 .mkv）：按文件名签发，字节仍决定类型"""
    user = await make_user()
    data = b"\x1a\x45\xdf\xa3" + b"\0" * 64
    body = {"content_type": declared, "bytes": len(data), "filename": filename}
    resp = await client.post("/assets/uploads", json=body, headers=user.headers)
    assert resp.status_code == 201, resp.text
    ticket = resp.json()["data"]
    assert ticket["path"].endswith(ext)
    async with httpx.AsyncClient() as http:
        sent_as = {"content-type": declared or "application/octet-stream"}
        put = await http.put(ticket["upload_url"], content=data, headers=sent_as)
    assert put.status_code == 200, put.text
    done = await client.post(f"/assets/{ticket['asset_id']}/complete", headers=user.headers)
    assert done.status_code == 200, done.text
    assert done.json()["data"]["mime"] == "video/x-matroska"


@pytest.mark.parametrize(("declared", "filename"), [("", None), ("", "notes.txt"), ("application/octet-stream", "x")])
async def test_a_file_of_no_type_and_no_known_name_is_refused_saying_what_to_send(
    client, make_user, declared, filename
):
    """没有类型、文件名也看不出类型 → 422，说明该发什么"""
    user = await make_user()
    body = {"content_type": declared, "bytes": 10, "filename": filename}
    resp = await client.post("/assets/uploads", json=body, headers=user.headers)
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"]["message"].startswith("Unsupported file type")


async def test_signed_upload_of_a_non_media_file_is_rejected(client, make_user):
    user = await make_user()
    ticket = (
        await client.post("/assets/uploads", json={"content_type": "video/mp4", "bytes": 11}, headers=user.headers)
    ).json()["data"]
    async with httpx.AsyncClient() as http:
        await http.put(ticket["upload_url"], content=b"hello world")
    resp = await client.post(f"/assets/{ticket['asset_id']}/complete", headers=user.headers)
    assert resp.status_code == 422 and resp.json()["error"]["code"] == "validation_error"
    asset = (await client.get(f"/assets/{ticket['asset_id']}", headers=user.headers)).json()["data"]
    assert asset["status"] == "rejected" and "Unsupported" in asset["metadata"]["reject_reason"]
    assert not await get_storage().exists(path=storage_path(asset["id"]))
    assert sql("select id from public.tasks where user_id = %s", (user.id,)) == []


async def test_an_empty_file_sent_through_a_signed_upload_is_refused_as_empty(client, make_user):
    """空文件：说明文件是空的（422），上传被拒绝；不是存储的 502、也不会停在 pending"""
    user = await make_user()
    body = {"content_type": "image/png", "bytes": 10}
    ticket = (await client.post("/assets/uploads", json=body, headers=user.headers)).json()["data"]
    async with httpx.AsyncClient() as http:
        assert (await http.put(ticket["upload_url"], content=b"", headers={"content-type": "image/png"})).is_success
    resp = await client.post(f"/assets/{ticket['asset_id']}/complete", headers=user.headers)
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"]["message"] == "The file is empty."
    asset = (await client.get(f"/assets/{ticket['asset_id']}", headers=user.headers)).json()["data"]
    assert asset["status"] == "rejected" and asset["metadata"]["reject_reason"] == "The file is empty."
    assert not await get_storage().exists(path=storage_path(ticket["asset_id"]))
    assert sql("select id from public.tasks where user_id = %s", (user.id,)) == []


async def test_a_picture_uploaded_as_html_is_rejected_before_anyone_is_served_it(client, make_user):
    """Storage serves an object with the type it was uploaded with: a PNG carrying a script, sent as text/html."""
    user = await make_user()
    data = png_bytes() + b"<script>alert(1)</script>"
    body = {"content_type": "image/png", "bytes": len(data)}
    ticket = (await client.post("/assets/uploads", json=body, headers=user.headers)).json()["data"]
    async with httpx.AsyncClient() as http:
        await http.put(ticket["upload_url"], content=data, headers={"content-type": "text/html"})
    resp = await client.post(f"/assets/{ticket['asset_id']}/complete", headers=user.headers)
    assert resp.status_code == 422
    assert resp.json()["error"]["message"] == "The file was uploaded as text/html; upload it as image/png."
    assert not await get_storage().exists(path=storage_path(ticket["asset_id"]))


async def test_oversize_direct_upload_is_413(client, make_user, monkeypatch):
    user = await make_user()
    monkeypatch.setattr(get_settings(), "max_direct_upload_bytes", 1000)
    for size in (1500, 200_000):  # within the form overhead (checked exactly), and far beyond (cut off while reading)
        resp = await direct_upload(client, user, png_bytes() + b"\0" * size)
        assert resp.status_code == 413, resp.text
        body = resp.json()
        assert body["success"] is False and body["error"]["code"] == "payload_too_large" and body["request_id"]
    assert sql("select id from public.assets where user_id = %s", (user.id,)) == []


async def test_oversize_chunked_upload_is_cut_off_while_reading(client, make_user, monkeypatch):
    user = await make_user()
    monkeypatch.setattr(get_settings(), "max_direct_upload_bytes", 1000)
    sent = 0

    async def body():  # no content-length: the limit must hold while streaming
        nonlocal sent
        yield b'--b\r\ncontent-disposition: form-data; name="file"; filename="a.png"\r\n\r\n' + png_bytes()
        for _ in range(1000):
            sent += 1
            yield b"\0" * 65536
        yield b"\r\n--b--\r\n"

    headers = {**user.headers, "content-type": "multipart/form-data; boundary=b"}
    resp = await client.post("/assets", content=body(), headers=headers)
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "payload_too_large"
    assert sent < 5  # stopped after the limit, not after the whole body


async def test_text_file_named_png_is_422(client, make_user):
    user = await make_user()
    resp = await direct_upload(client, user, b"just some text, honestly", "fake.png")
    assert resp.status_code == 422
    assert resp.json()["error"]["code"] == "validation_error"
    assert resp.json()["error"]["details"] == [{"field": "file", "message": "unsupported type"}]
    resp = await client.post("/assets", json={"file": "x"}, headers=user.headers)
    assert resp.status_code == 422
    resp = await client.post("/assets", data={"project_id": "x"}, files={"other": ("a", b"b")}, headers=user.headers)
    assert resp.status_code == 422


async def test_direct_upload_into_a_project(client, make_user):
    alice, bob = await make_user(), await make_user()
    project = (await client.post("/projects", json={"name": "p"}, headers=alice.headers)).json()["data"]
    resp = await direct_upload(client, alice, png_bytes(), project_id=project["id"])
    assert resp.json()["data"]["project_id"] == project["id"]
    resp = await direct_upload(client, bob, png_bytes(), project_id=project["id"])
    assert resp.status_code == 404


async def test_an_uploads_check_and_its_poster_stay_in_the_uploads_project(client, make_user):
    from gpu_jobs.runner import run_task_async

    user = await make_user()
    project = (await client.post("/projects", json={"name": "p"}, headers=user.headers)).json()["data"]
    asset = (await direct_upload(client, user, png_bytes(), project_id=project["id"])).json()["data"]
    listed = await client.get("/tasks", params={"project_id": project["id"]}, headers=user.headers)
    assert [task["id"] for task in listed.json()["data"]["items"]] == [asset["probe_task_id"]]
    assert await run_task_async(asset["probe_task_id"]) == "completed"
    posters = sql("select project_id from public.assets where source_task_id = %s", (asset["probe_task_id"],))
    assert [str(poster["project_id"]) for poster in posters] == [project["id"]]


async def test_an_asset_record_never_lands_in_another_users_project(client, make_user):
    alice, bob = await make_user(), await make_user()
    project = (await client.post("/projects", json={"name": "bob's"}, headers=bob.headers)).json()["data"]
    row = await get_asset_service().create_asset_record(
        user_id=alice.id, kind="image", path=f"{alice.id}/tasks/x/1/result-0.png", project_id=project["id"]
    )
    assert row["project_id"] is None


async def test_other_users_assets_are_404(client, make_user):
    alice, bob = await make_user(), await make_user()
    asset = (await direct_upload(client, alice, png_bytes())).json()["data"]
    for method, url in (
        ("GET", f"/assets/{asset['id']}"),
        ("DELETE", f"/assets/{asset['id']}"),
        ("POST", f"/assets/{asset['id']}/complete"),
    ):
        resp = await client.request(method, url, headers=bob.headers)
        assert resp.status_code == 404, (method, url)
        assert resp.json()["error"]["code"] == "not_found"
    assert (await client.get("/assets", headers=bob.headers)).json()["data"]["items"] == []
    assert await get_storage().exists(path=storage_path(asset["id"]))
    with pytest.raises(Forbidden):
        await get_storage().create_signed_url(path=storage_path(asset["id"]), user_id=bob.id)


async def test_delete_removes_the_object_and_the_row(client, make_user):
    user = await make_user()
    asset = (await direct_upload(client, user, png_bytes())).json()["data"]
    path = storage_path(asset["id"])
    resp = await client.delete(f"/assets/{asset['id']}", headers=user.headers)
    assert resp.json() == {"success": True, "data": {"id": asset["id"], "deleted": True}}
    assert not await get_storage().exists(path=path)
    assert (await client.get(f"/assets/{asset['id']}", headers=user.headers)).status_code == 404


async def test_deleting_an_upload_removes_the_poster_its_check_made(client, make_user):
    from gpu_jobs.runner import run_task_async

    user = await make_user()
    asset = (await direct_upload(client, user, png_bytes())).json()["data"]
    assert await run_task_async(asset["probe_task_id"]) == "completed"
    [poster] = sql("select id, path from public.assets where source_task_id = %s", (asset["probe_task_id"],))
    assert await get_storage().exists(path=poster["path"])
    assert (await client.delete(f"/assets/{asset['id']}", headers=user.headers)).status_code == 200
    assert (await client.get("/assets", headers=user.headers)).json()["data"]["items"] == []
    assert not await get_storage().exists(path=poster["path"])


async def test_a_poster_a_task_reads_outlives_its_upload(client, make_user):
    from gpu_jobs.runner import run_task_async

    user = await make_user()
    asset = (await direct_upload(client, user, png_bytes())).json()["data"]
    assert await run_task_async(asset["probe_task_id"]) == "completed"
    [poster] = sql("select id, path from public.assets where source_task_id = %s", (asset["probe_task_id"],))
    body = {"model_key": "image.upscale", "params": {"image_asset_id": str(poster["id"]), "scale": 2}}
    assert (await client.post("/tasks", json=body, headers=user.headers)).status_code == 201
    assert (await client.delete(f"/assets/{asset['id']}", headers=user.headers)).status_code == 200
    assert [row["id"] for row in sql("select id from public.assets where user_id = %s", (user.id,))] == [poster["id"]]
    assert await get_storage().exists(path=poster["path"])


async def test_an_upload_deleted_while_it_is_checked_leaves_no_poster(client, make_user, monkeypatch):
    """检查运行中删除上传：检查的海报不留下（行与文件），检查以取消结束"""
    from gpu_jobs import runner
    from gpu_jobs.runner import run_task_async

    user = await make_user()
    asset = (await direct_upload(client, user, png_bytes())).json()["data"]
    real_upload, uploaded = runner.upload_to_supabase, []

    async def upload_then_delete(local, path, mime):
        await real_upload(local, path, mime)
        uploaded.append(path)
        assert (await client.delete(f"/assets/{asset['id']}", headers=user.headers)).status_code == 200

    monkeypatch.setattr(runner, "upload_to_supabase", upload_then_delete)
    assert await run_task_async(asset["probe_task_id"]) == "canceled"
    task = task_row(asset["probe_task_id"])
    assert task["status"] == "canceled" and task["result"] is None
    assert task["error"] == {"code": "canceled", "message": "The upload was deleted before its check finished."}
    assert sql("select id from public.assets where user_id = %s", (user.id,)) == []
    assert len(uploaded) == 1 and not await get_storage().exists(path=uploaded[0])


@pytest.mark.parametrize("when", ["before it ran", "while it downloaded"])
async def test_an_upload_deleted_before_its_check_read_it_ends_the_check_canceled(client, make_user, monkeypatch, when):
    """检查还没读到文件就删除上传（排队中、下载中）：检查以取消结束，不是失败"""
    from gpu_jobs import task_base
    from gpu_jobs.runner import run_task_async

    user = await make_user()
    asset = (await direct_upload(client, user, png_bytes())).json()["data"]
    if when == "before it ran":
        assert (await client.delete(f"/assets/{asset['id']}", headers=user.headers)).status_code == 200
    else:
        real_download = task_base.download_file_to_temp

        async def delete_then_download(row, workdir):
            assert (await client.delete(f"/assets/{asset['id']}", headers=user.headers)).status_code == 200
            return await real_download(row, workdir)

        monkeypatch.setattr("gpu_jobs.runner.download_file_to_temp", delete_then_download)
    assert await run_task_async(asset["probe_task_id"]) == "canceled"
    task = task_row(asset["probe_task_id"])
    assert task["status"] == "canceled"
    assert task["error"] == {"code": "canceled", "message": "The upload was deleted before its check finished."}


async def test_an_input_of_an_unfinished_task_is_kept_until_the_task_ends(client, make_user):
    user = await make_user()
    asset = make_asset(user.id, width=64, height=48)
    body = {"model_key": "image.upscale", "params": {"image_asset_id": asset}}
    task = (await client.post("/tasks", json=body, headers=user.headers)).json()["data"]
    resp = await client.delete(f"/assets/{asset}", headers=user.headers)
    assert resp.status_code == 409 and resp.json()["error"]["code"] == "conflict"
    assert resp.json()["error"]["details"] == [{"task_id": task["id"]}]
    assert sql("select id from public.assets where id = %s", (asset,))  # a retry of the task still finds it

    assert (await client.post(f"/tasks/{task['id']}/cancel", headers=user.headers)).status_code == 200
    assert (await client.delete(f"/assets/{asset}", headers=user.headers)).status_code == 200


async def while_held(hold, request) -> tuple:
    """另一条连接在未提交的事务里做 hold(conn)，同时发出请求；等请求卡在锁上再提交，返回 (hold 的结果, 回答)"""
    import asyncio
    import time

    with connect() as conn, conn.transaction():
        held = hold(conn)
        pending = asyncio.create_task(request)
        deadline = time.monotonic() + 20
        while not sql("select 1 from pg_stat_activity where wait_event_type = 'Lock'"):
            assert time.monotonic() < deadline, "the request never waited for the lock"
            await asyncio.sleep(0.02)
    return held, await pending


async def test_a_delete_racing_the_creation_of_a_task_waits_and_keeps_the_input(client, make_user):
    """任务正在创建（已扣费、未提交）时删除它的输入：删除等它提交，然后 409"""
    user = await make_user()
    asset = make_asset(user.id, width=64, height=48)
    created, resp = await while_held(
        lambda conn: conn.execute(
            "select public.create_task(%s, 'image.upscale', '{}'::jsonb, 5, null, null, %s::uuid[]) as r",
            (user.id, [asset]),
        ).fetchone()["r"],
        client.delete(f"/assets/{asset}", headers=user.headers),
    )
    assert resp.status_code == 409, resp.text
    assert resp.json()["error"]["details"] == [{"task_id": created["task"]["id"]}]
    assert sql("select id from public.assets where id = %s", (asset,))


async def test_a_poster_a_task_is_being_created_with_outlives_its_upload(client, make_user):
    """任务正在以海报为输入创建（已扣费、未提交）时删除上传：删除等它提交，海报（行与文件）留下"""
    from gpu_jobs.runner import run_task_async

    user = await make_user()
    asset = (await direct_upload(client, user, png_bytes())).json()["data"]
    assert await run_task_async(asset["probe_task_id"]) == "completed"
    [poster] = sql("select id, path from public.assets where source_task_id = %s", (asset["probe_task_id"],))
    created, resp = await while_held(
        lambda conn: conn.execute(
            "select public.create_task(%s, 'image.upscale', '{}'::jsonb, 5, null, null, %s::uuid[]) as r",
            (user.id, [poster["id"]]),
        ).fetchone()["r"],
        client.delete(f"/assets/{asset['id']}", headers=user.headers),
    )
    assert resp.status_code == 200, resp.text
    assert created["task"]["input_asset_ids"] == [str(poster["id"])]
    assert [row["id"] for row in sql("select id from public.assets where user_id = %s", (user.id,))] == [poster["id"]]
    assert await get_storage().exists(path=poster["path"])


async def test_a_task_racing_the_deletion_of_its_input_is_refused_uncharged(client, make_user):
    user = await make_user()
    asset = make_asset(user.id, width=64, height=48)
    body = {"model_key": "image.upscale", "params": {"image_asset_id": asset}}
    _, resp = await while_held(
        lambda conn: conn.execute("delete from public.assets where id = %s", (asset,)),
        client.post("/tasks", json=body, headers=user.headers),
    )
    assert resp.status_code == 404, resp.text
    assert resp.json()["error"]["message"] == "An input asset of this task was deleted."
    assert balance(user.id) == 100
    assert not sql("select id from public.tasks where user_id = %s", (user.id,))


async def test_a_task_racing_the_deletion_of_its_project_is_a_404(client, make_user):
    user = await make_user()
    asset = make_asset(user.id, width=64, height=48)
    project = (await client.post("/projects", json={"name": "p"}, headers=user.headers)).json()["data"]["id"]
    body = {"model_key": "image.upscale", "project_id": project, "params": {"image_asset_id": asset}}
    _, resp = await while_held(
        lambda conn: conn.execute("delete from public.projects where id = %s", (project,)),
        client.post("/tasks", json=body, headers=user.headers),
    )
    assert resp.status_code == 404, resp.text
    assert resp.json()["error"]["message"] == "Project not found."
    assert balance(user.id) == 100


async def test_a_task_racing_a_project_delete_that_reaches_its_input_does_not_deadlock(client, make_user):
    """删除项目先锁项目、再经 on delete set null 改它的资源：创建任务按同样的顺序加锁，不会互等"""
    import asyncio

    user = await make_user()
    asset = make_asset(user.id, width=64, height=48)
    project = (await client.post("/projects", json={"name": "p"}, headers=user.headers)).json()["data"]["id"]
    sql("update public.assets set project_id = %s where id = %s", (project, asset))
    body = {"model_key": "image.upscale", "project_id": project, "params": {"image_asset_id": asset}}
    with connect() as conn, conn.transaction():
        conn.execute("select id from public.projects where id = %s for update", (project,))  # the delete begins
        creating = asyncio.create_task(client.post("/tasks", json=body, headers=user.headers))
        deadline = asyncio.get_running_loop().time() + 20
        while not sql("select 1 from pg_stat_activity where wait_event_type = 'Lock'"):
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.02)
        conn.execute("delete from public.projects where id = %s", (project,))  # and reaches the asset
    resp = await creating
    assert resp.status_code == 404, resp.text
    assert resp.json()["error"]["message"] == "Project not found."
    assert balance(user.id) == 100


async def test_lists_carry_download_urls_and_a_file_gone_from_storage_reads_as_null(client, make_user):
    user = await make_user()
    data = png_bytes()
    kept, lost, pending = [(await direct_upload(client, user, data)).json()["data"]["id"] for _ in range(3)]
    for asset_id in (kept, lost):
        await get_asset_service().mark_probed(
            asset_id=asset_id, probe={"kind": "image", "width": 8, "height": 6}, reason=None
        )
    await get_storage().remove(paths=[storage_path(lost)])

    items = {a["id"]: a for a in (await client.get("/assets", headers=user.headers)).json()["data"]["items"]}
    assert items[lost]["download_url"] is None and items[pending]["download_url"] is None
    async with httpx.AsyncClient() as http:
        assert (await http.get(items[kept]["download_url"])).content == data  # a gallery needs no call per file
    resp = await client.get(f"/assets/{lost}", headers=user.headers)
    assert resp.status_code == 200 and resp.json()["data"]["download_url"] is None  # the row is there: not a 404


async def test_a_gallery_polled_again_costs_no_storage_request_until_a_file_goes(client, make_user):
    user = await make_user()
    ids = [(await direct_upload(client, user, png_bytes())).json()["data"]["id"] for _ in range(2)]
    for asset_id in ids:
        await get_asset_service().mark_probed(
            asset_id=asset_id, probe={"kind": "image", "width": 8, "height": 6}, reason=None
        )
    with storage_signings() as signings:
        pages = [(await client.get("/assets", headers=user.headers)).json()["data"]["items"] for _ in range(2)]
        one = (await client.get(f"/assets/{ids[0]}", headers=user.headers)).json()["data"]
    assert len(signings) == 1 and pages[0] == pages[1] and one["download_url"] == pages[0][1]["download_url"]
    assert len({a["download_url"] for a in pages[0]}) == 2
    await get_storage().remove(paths=[storage_path(ids[0])])
    resp = await client.get(f"/assets/{ids[0]}", headers=user.headers)
    assert resp.json()["data"]["download_url"] is None


async def test_list_filters_and_pages(client, make_user):
    user = await make_user()
    service = get_asset_service()
    ids = []
    for _ in range(3):
        ids.append((await direct_upload(client, user, png_bytes())).json()["data"]["id"])
    await service.mark_probed(asset_id=ids[0], probe={"kind": "image", "width": 8, "height": 6}, reason=None)
    await service.mark_probed(asset_id=ids[1], probe=None, reason="The image is truncated.")
    video = await service.create_asset_record(
        user_id=user.id,
        kind="video",
        path=f"{user.id}/tasks/t/result-0.mp4",
        mime="video/mp4",
        size=10,
        width=64,
        height=48,
        duration_s=1,
        fps=24,
    )

    async def listed(query: str = "") -> list[str]:
        return [a["id"] for a in (await client.get(f"/assets?{query}", headers=user.headers)).json()["data"]["items"]]

    assert await listed() == [str(video["id"]), ids[2], ids[1], ids[0]]
    assert await listed("kind=video") == [str(video["id"])]
    assert await listed("status=ready&kind=image") == [ids[0]]
    assert await listed("status=rejected") == [ids[1]]
    rejected = (await client.get(f"/assets/{ids[1]}", headers=user.headers)).json()["data"]
    assert rejected["metadata"]["reject_reason"] == "The image is truncated."
    page = (await client.get("/assets?limit=3", headers=user.headers)).json()["data"]
    rest = (await client.get(f"/assets?limit=3&cursor={page['next_cursor']}", headers=user.headers)).json()["data"]
    assert [a["id"] for a in rest["items"]] == [ids[0]] and rest["next_cursor"] is None
    assert (await client.get("/assets?kind=document", headers=user.headers)).status_code == 422


async def test_the_type_sniffed_at_upload_outlives_the_probe(client, make_user):
    """FFmpeg names MP4 and QuickTime alike ("mov,mp4,..."): the probe must not turn a .mov into video/mp4."""
    user = await make_user()
    asset = (await direct_upload(client, user, png_bytes())).json()["data"]
    sql("update public.assets set kind = 'video', mime = 'video/quicktime' where id = %s", (asset["id"],))
    probe = {"kind": "video", "mime": "video/mp4", "width": 8, "height": 6, "duration_s": 1.0, "fps": 24.0}
    row = await get_asset_service().mark_probed(asset_id=asset["id"], probe=probe, reason=None)
    assert row["status"] == "ready" and row["mime"] == "video/quicktime"


async def test_upload_checks_do_not_count_toward_the_active_task_limit(client, make_user, monkeypatch):
    from tests.factories import make_asset

    user = await make_user()
    monkeypatch.setattr(get_settings(), "max_active_tasks_per_user", 2)
    for _ in range(3):  # three uploads waiting for their check (no worker here)
        assert (await direct_upload(client, user, png_bytes())).status_code == 201
    ready = make_asset(user.id)
    body = {"model_key": "image.upscale", "params": {"image_asset_id": ready, "scale": 2}}
    resp = await client.post("/tasks", json=body, headers=user.headers)
    assert resp.status_code == 201, resp.text


async def test_uploads_still_being_checked_are_capped(client, make_user, monkeypatch):
    user = await make_user()
    monkeypatch.setattr(get_settings(), "max_upload_checks_per_user", 2)
    for _ in range(2):
        assert (await direct_upload(client, user, png_bytes())).status_code == 201
    resp = await direct_upload(client, user, png_bytes())
    assert resp.status_code == 429 and resp.json()["error"]["code"] == "too_many_active_tasks"
    resp = await client.post("/assets/uploads", json={"content_type": "image/png", "bytes": 10}, headers=user.headers)
    assert resp.status_code == 429
    assert len(sql("select id from public.assets where user_id = %s", (user.id,))) == 2  # nothing stored for them


async def test_an_upload_check_cannot_be_canceled(client, make_user):
    user = await make_user()
    asset = (await direct_upload(client, user, png_bytes())).json()["data"]
    resp = await client.post(f"/tasks/{asset['probe_task_id']}/cancel", headers=user.headers)
    assert resp.status_code == 409 and "delete the asset" in resp.json()["error"]["message"]
    assert task_row(asset["probe_task_id"])["status"] == "queued"


@pytest.mark.parametrize("status", ["failed", "canceled"])
async def test_a_check_that_ends_without_a_verdict_rejects_its_upload(client, make_user, status):
    """The reaper giving up, a crash, a cancel by the server: the asset must not stay pending for good."""
    user = await make_user()
    asset = (await direct_upload(client, user, png_bytes())).json()["data"]
    sql("select public.finish_task(%s, %s)", (asset["probe_task_id"], status))
    row = (await client.get(f"/assets/{asset['id']}", headers=user.headers)).json()["data"]
    assert row["status"] == "rejected" and "upload it again" in row["metadata"]["reject_reason"]


async def test_mark_probed_changes_only_pending_assets(client, make_user):
    user = await make_user()
    asset = (await direct_upload(client, user, png_bytes())).json()["data"]
    service = get_asset_service()
    assert (await service.mark_probed(asset_id=asset["id"], probe={"width": 8, "height": 6}, reason=None))[
        "status"
    ] == "ready"
    assert await service.mark_probed(asset_id=asset["id"], probe=None, reason="late") is None
    with pytest.raises(Forbidden):
        await service.create_asset_record(user_id=user.id, kind="image", path=f"{uuid.uuid4()}/x.png")


@pytest.mark.parametrize(
    ("head", "mime"),
    [
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 8, "image/png"),
        (b"\xff\xd8\xff\xe0\0\x10JFIF", "image/jpeg"),
        (b"GIF89a\x01\0", "image/gif"),
        (b"RIFF\0\0\0\0WEBPVP8 ", "image/webp"),
        (b"RIFF\0\0\0\0AVI LIST", "video/x-msvideo"),
        (b"\0\0\0\x20ftypisom\0\0\2\0", "video/mp4"),
        (b"\0\0\0\x14ftypqt  \0\0\0\0", "video/quicktime"),
        (b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81\x01\x42\x82\x84webm", "video/webm"),
        (b"\x1a\x45\xdf\xa3\xa3\x42\x86\x81\x01\x42\x82\x88matroska", "video/x-matroska"),
        (b"\0\0\0\x18ftypheic", None),
        (b"%PDF-1.7", None),
        (b"", None),
    ],
)
def test_sniff(head, mime):
    media = sniff(head)
    assert (media.mime if media else None) == mime


async def test_announced_uploads_count_toward_the_cap_and_are_swept_once_their_url_expires(
    client, make_user, monkeypatch
):
    from lib.reaper import reap

    user = await make_user()
    monkeypatch.setattr(get_settings(), "max_upload_checks_per_user", 2)
    announce = {"content_type": "image/png", "bytes": 10}
    tickets = [(await client.post("/assets/uploads", json=announce, headers=user.headers)).json()["data"] for _ in "ab"]
    assert (await client.post("/assets/uploads", json=announce, headers=user.headers)).status_code == 429
    async with httpx.AsyncClient() as http:  # one of them was uploaded, never completed
        assert (await http.put(tickets[0]["upload_url"], content=png_bytes())).status_code == 200
    completed = (await direct_upload(client, user, png_bytes())).json()  # 429 too: the cap is full
    assert completed["error"]["code"] == "too_many_active_tasks"

    uploaded = storage_path(tickets[0]["asset_id"])
    sql("update public.assets set created_at = now() - interval '3 hours' where user_id = %s", (user.id,))
    assert (await reap()).get("abandoned_uploads") == 2
    assert sql("select id from public.assets where user_id = %s", (user.id,)) == []
    assert not await get_storage().exists(path=uploaded)
    assert (await client.post("/assets/uploads", json=announce, headers=user.headers)).status_code == 201


async def test_the_sweep_leaves_uploads_being_checked_and_fresh_announcements(client, make_user):
    from lib.reaper import reap

    user = await make_user()
    checked = (await direct_upload(client, user, png_bytes())).json()["data"]  # its check is queued
    announce = {"content_type": "image/png", "bytes": 10}
    fresh = (await client.post("/assets/uploads", json=announce, headers=user.headers)).json()["data"]
    sql("update public.assets set created_at = now() - interval '3 hours' where id = %s", (checked["id"],))
    assert "abandoned_uploads" not in await reap()
    ids = {str(r["id"]) for r in sql("select id from public.assets where user_id = %s", (user.id,))}
    assert ids == {checked["id"], fresh["asset_id"]}


@pytest.mark.parametrize(
    ("scan", "params", "index"),
    [
        ("REJECTED_FILES", (3600, 500), "assets_rejected_unswept_idx"),
        ("UNCOMPLETED_UPLOADS", (3600, "probe:", 500), "assets_pending_created_idx"),
    ],
)
def test_the_sweeps_scans_read_an_index_of_the_rows_they_look_for(scan, params, index):
    """清理的两次扫描各走一个只含其目标行的部分索引"""
    # Run by the reaper every minute: a scan on status alone would read the whole assets table each time.
    with connect() as conn:
        conn.execute("set enable_seqscan = off")  # a table this small would be read whole anyway
        plan = "\n".join(row["QUERY PLAN"] for row in conn.execute(f"explain {getattr(assets, scan)}", params))
    assert index in plan


async def test_the_sweep_removes_files_in_batches_storage_takes(client, make_user, monkeypatch):
    """一轮清理的文件（未完成的上传、被拒绝的、墓碑）分批删除：存储一次最多删 REMOVE_BATCH 个，超过就整批被拒"""
    from lib.reaper import reap

    user = await make_user()
    monkeypatch.setattr(assets, "REMOVE_BATCH", 2)
    storage, real_remove, calls = get_storage(), get_storage().remove, []

    async def remove(*, paths, user_id=None):
        calls.append(len(paths))
        if len(paths) > assets.REMOVE_BATCH:  # as Supabase Storage refuses a bulk delete over its limit
            raise RuntimeError("Bulk object requests are limited")
        return await real_remove(paths=paths, user_id=user_id)

    monkeypatch.setattr(storage, "remove", remove)
    announce = {"content_type": "image/png", "bytes": 10_000}
    tickets = [(await client.post("/assets/uploads", json=announce, headers=user.headers)).json()["data"] for _ in "ab"]
    async with httpx.AsyncClient() as http:
        for ticket in tickets:
            assert (await http.put(ticket["upload_url"], content=png_bytes())).status_code == 200
    rejected = (await direct_upload(client, user, png_bytes())).json()["data"]  # its check crashed: file kept
    sql("update public.tasks set status = 'failed' where id = %s", (rejected["probe_task_id"],))
    sql("update public.assets set created_at = now() - interval '4 hours' where user_id = %s", (user.id,))
    assert (await reap()).get("abandoned_uploads") == 3
    assert [r["status"] for r in sql("select status from public.assets where user_id = %s", (user.id,))] == ["rejected"]
    assert not await get_storage().exists(path=storage_path(rejected["id"]))
    for ticket in tickets:
        assert not await get_storage().exists(path=ticket["path"])
    assert max(calls) <= 2


EXPIRED = "The upload was not completed within 3 hours of its announcement; announce it again."


async def uploaded_ticket(client, user) -> dict:
    """申报一个签名上传并把文件传上去（未 complete）"""
    announce = {"content_type": "image/png", "bytes": 10_000}
    ticket = (await client.post("/assets/uploads", json=announce, headers=user.headers)).json()["data"]
    async with httpx.AsyncClient() as http:
        assert (await http.put(ticket["upload_url"], content=png_bytes())).status_code == 200
    return ticket


def age(asset_id: str, interval: str) -> None:
    sql(f"update public.assets set created_at = now() - interval '{interval}' where id = %s", (asset_id,))


async def test_a_complete_later_than_the_sweeps_age_is_refused_as_expired(client, make_user):
    """申报三小时后才 complete：明确拒绝为过期（不建检查），清理照常删掉行与文件"""
    from lib.reaper import reap

    user = await make_user()
    ticket = await uploaded_ticket(client, user)
    age(ticket["asset_id"], "3 hours 1 minute")
    resp = await client.post(f"/assets/{ticket['asset_id']}/complete", headers=user.headers)
    assert resp.status_code == 409, resp.text
    assert resp.json()["error"] == {"code": "conflict", "message": EXPIRED}
    assert not sql("select id from public.tasks where user_id = %s", (user.id,))
    assert (await reap()).get("abandoned_uploads") == 1
    assert not await get_storage().exists(path=ticket["path"])
    assert (await client.post(f"/assets/{ticket['asset_id']}/complete", headers=user.headers)).status_code == 404


async def test_a_complete_sent_again_late_while_its_check_waits_answers_the_same(client, make_user):
    """检查还在排队时，三小时后再发 complete：照常答同一个检查（清理不碰有检查的上传）"""
    user = await make_user()
    ticket = await uploaded_ticket(client, user)
    first = (await client.post(f"/assets/{ticket['asset_id']}/complete", headers=user.headers)).json()["data"]
    age(ticket["asset_id"], "3 hours 1 minute")
    again = await client.post(f"/assets/{ticket['asset_id']}/complete", headers=user.headers)
    assert again.status_code == 200, again.text
    assert again.json()["data"]["probe_task_id"] == first["probe_task_id"]


async def test_a_complete_arriving_while_the_sweep_removes_its_file_is_refused_as_expired(
    client, make_user, monkeypatch
):
    """清理正在删文件时来的 complete：明确拒绝为过期，而不是答应了检查、行却随后被删掉"""
    from lib.reaper import reap

    user = await make_user()
    ticket = await uploaded_ticket(client, user)
    age(ticket["asset_id"], "3 hours 1 minute")
    storage, real_remove, answers = get_storage(), get_storage().remove, []

    async def complete_then_remove(*, paths, user_id=None):
        answers.append(await client.post(f"/assets/{ticket['asset_id']}/complete", headers=user.headers))
        return await real_remove(paths=paths, user_id=user_id)

    monkeypatch.setattr(storage, "remove", complete_then_remove)
    assert (await reap()).get("abandoned_uploads") == 1
    [resp] = answers
    assert resp.status_code == 409, resp.text
    assert resp.json()["error"] == {"code": "conflict", "message": EXPIRED}
    assert sql("select id from public.assets where user_id = %s", (user.id,)) == []
    assert not sql("select id from public.tasks where user_id = %s", (user.id,))


@pytest.mark.parametrize("step", ["info", "read_head", "consume_credits"])
async def test_a_complete_the_sweep_overtakes_midway_is_told_the_upload_is_gone(client, make_user, monkeypatch, step):
    """complete 开始时还没过期、做到一半清理把上传删了：每一步都答资源已不在（不是"还没上传"或"文件不在"）"""
    from lib.credits import get_credit_service
    from lib.reaper import reap

    user = await make_user()
    ticket = await uploaded_ticket(client, user)
    age(ticket["asset_id"], "2 hours 59 minutes")
    owner = get_credit_service() if step == "consume_credits" else get_storage()
    real = getattr(owner, step)

    async def swept_then(**kwargs):
        age(ticket["asset_id"], "3 hours 1 minute")
        assert (await reap()).get("abandoned_uploads") == 1
        return await real(**kwargs)

    monkeypatch.setattr(owner, step, swept_then)
    resp = await client.post(f"/assets/{ticket['asset_id']}/complete", headers=user.headers)
    monkeypatch.undo()
    assert resp.status_code == 404, resp.text
    assert resp.json()["error"] == {"code": "not_found", "message": "Asset not found."}  # as complete after a sweep
    assert sql("select id from public.assets where user_id = %s", (user.id,)) == []
    assert not await get_storage().exists(path=ticket["path"])
    assert not sql("select id from public.tasks where user_id = %s", (user.id,))


async def test_the_sweep_leaves_an_upload_whose_check_is_being_created(client, make_user):
    """清理时上传的检查正在创建（未提交）：清理不碰它（行与文件），检查提交后照常进行"""
    user = await make_user()
    ticket = await uploaded_ticket(client, user)
    age(ticket["asset_id"], "3 hours 1 minute")
    with connect() as conn, conn.transaction():
        conn.execute(
            "select public.create_task(%s, 'media.probe', %s::jsonb, 0, %s, null, %s::uuid[])",
            (user.id, f'{{"asset_id": "{ticket["asset_id"]}"}}', f"probe:{ticket['asset_id']}", [ticket["asset_id"]]),
        )
        sweeping = asyncio.create_task(get_asset_service().sweep_expired_uploads())
        deadline = asyncio.get_running_loop().time() + 20
        while not sweeping.done() and not sql("select 1 from pg_stat_activity where wait_event_type = 'Lock'"):
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.02)
    assert await sweeping == 0
    assert [str(r["id"]) for r in sql("select id from public.assets where user_id = %s", (user.id,))] == [
        ticket["asset_id"]
    ]
    assert await get_storage().exists(path=ticket["path"])


async def expire_tombstones(user) -> None:
    sql("update public.upload_tombstones set expires_at = now() - interval '1 second' where user_id = %s", (user.id,))


async def test_a_slow_upload_still_running_when_swept_leaves_no_file_behind(client, make_user):
    """清理时 PUT 还在传（慢网、2 GiB）：行被清掉后文件才到，墓碑让下一轮把它删掉，而不是永远留着"""
    from lib.reaper import reap

    user = await make_user()
    announce = {"content_type": "image/png", "bytes": 10_000}
    ticket = (await client.post("/assets/uploads", json=announce, headers=user.headers)).json()["data"]
    path = storage_path(ticket["asset_id"])
    sql("update public.assets set created_at = now() - interval '4 hours' where id = %s", (ticket["asset_id"],))
    assert (await reap()).get("abandoned_uploads") == 1
    async with httpx.AsyncClient() as http:  # the PUT that had begun before the URL expired ends now
        assert (await http.put(ticket["upload_url"], content=png_bytes())).status_code == 200
    assert await get_storage().exists(path=path)
    # The swept upload does not hold a place: its URL no longer works.
    assert (await client.post("/assets/uploads", json=announce, headers=user.headers)).status_code == 201
    await expire_tombstones(user)
    assert (await reap()).get("abandoned_uploads") == 1
    assert not await get_storage().exists(path=path)


async def test_an_upload_larger_than_announced_is_refused_and_its_url_cannot_park_a_file(client, make_user):
    """上限按申报的大小检查：实际更大就拒绝；被拒绝后同一个 URL 再传一次，文件也会被清理"""
    from lib.reaper import reap

    user = await make_user()
    ticket = (
        await client.post("/assets/uploads", json={"content_type": "image/png", "bytes": 10}, headers=user.headers)
    ).json()["data"]
    path = storage_path(ticket["asset_id"])
    async with httpx.AsyncClient() as http:
        assert (await http.put(ticket["upload_url"], content=png_bytes())).status_code == 200
    resp = await client.post(f"/assets/{ticket['asset_id']}/complete", headers=user.headers)
    assert resp.status_code == 413, resp.text
    assert "more than the 10 announced" in resp.json()["error"]["message"]
    assert not await get_storage().exists(path=path)
    async with httpx.AsyncClient() as http:  # the URL still works for its two hours
        assert (await http.put(ticket["upload_url"], content=png_bytes())).status_code == 200
    await expire_tombstones(user)
    assert (await reap()).get("abandoned_uploads") == 1
    assert not await get_storage().exists(path=path)
    asset = (await client.get(f"/assets/{ticket['asset_id']}", headers=user.headers)).json()["data"]
    assert asset["status"] == "rejected"


async def test_an_upload_the_check_refuses_has_its_file_removed(client, make_user):
    from gpu_jobs.runner import run_task_async

    user = await make_user()
    data = png_bytes()
    asset = (await direct_upload(client, user, data[: len(data) // 2])).json()["data"]  # a truncated PNG
    assert await run_task_async(asset["probe_task_id"]) == "failed"
    row = (await client.get(f"/assets/{asset['id']}", headers=user.headers)).json()["data"]
    assert row["status"] == "rejected" and "truncated" in row["metadata"]["reject_reason"]
    assert not await get_storage().exists(path=storage_path(asset["id"]))


async def test_a_late_verdict_on_an_upload_already_checked_leaves_it_alone(client, make_user):
    """已判定 ready 的上传：迟到的拒绝（被取代的那次检查）不改状态，也不删文件"""
    from gpu_jobs.runner import run_task_async

    user = await make_user()
    asset = (await direct_upload(client, user, png_bytes())).json()["data"]
    assert await run_task_async(asset["probe_task_id"]) == "completed"
    await get_asset_service().reject_upload(asset_id=asset["id"], reason="The image is truncated or corrupt.")
    row = (await client.get(f"/assets/{asset['id']}", headers=user.headers)).json()["data"]
    assert row["status"] == "ready"
    assert await get_storage().exists(path=storage_path(asset["id"]))


async def test_a_deleted_accounts_files_are_removed_by_the_reaper(client, make_user):
    """删除账号会级联删掉行，存储里的文件（上传、结果、海报）由回收器随后删掉；别人的文件不动"""
    from gpu_jobs.runner import run_task_async
    from lib.reaper import reap

    user, other = await make_user(), await make_user()
    mine = (await direct_upload(client, user, png_bytes())).json()["data"]
    assert await run_task_async(mine["probe_task_id"]) == "completed"  # its poster lies under tasks/
    theirs = (await direct_upload(client, other, png_bytes())).json()["data"]
    files = await get_storage().list_files(prefix=f"{user.id}/tasks")
    assert len(files) == 1
    ticket = (
        await client.post("/assets/uploads", json={"content_type": "image/png", "bytes": 10}, headers=user.headers)
    ).json()["data"]
    sql("delete from auth.users where id = %s", (user.id,))
    assert (await reap()).get("departed_users_files") == 2
    assert not await get_storage().exists(path=storage_path_of(user, mine["id"]))
    assert not await get_storage().exists(path=files[0])
    assert await get_storage().exists(path=storage_path(theirs["id"]))
    assert "departed_users_files" not in await reap()  # swept; the next sweep waits for its upload URLs to expire

    async with httpx.AsyncClient() as http:  # a URL handed out before the deletion still works for a while
        assert (await http.put(ticket["upload_url"], content=png_bytes())).status_code == 200
    sql(
        "update public.departed_users"
        " set departed_at = departed_at - interval '4 hours', swept_at = swept_at - interval '4 hours'"
    )
    assert (await reap()).get("departed_users_files") == 1
    assert sql("select user_id from public.departed_users") == []


async def test_a_large_deleted_account_is_swept_a_slice_per_pass(client, make_user):
    user = await make_user()
    uploads = [(await direct_upload(client, user, png_bytes())).json()["data"]["id"] for _ in range(3)]
    for asset_id in uploads:  # each check's poster lies in a folder of its own under tasks/
        sql(
            "select public.finish_task(t.id, 'completed') from public.tasks t where t.params->>'asset_id' = %s",
            (asset_id,),
        )
    sql("delete from auth.users where id = %s", (user.id,))
    service, passes, removed = get_asset_service(), 0, 0
    while sql("select swept_at from public.departed_users where swept_at is null"):
        removed += await service.sweep_departed_users(budget_s=0)  # one folder, then the budget is spent
        passes += 1
        assert passes < 10
    assert removed == 3 and passes >= 2
    assert await get_storage().list_files(prefix=f"{user.id}/uploads") == []


async def test_accounts_whose_files_cannot_be_removed_do_not_hold_the_others_back(client, make_user):
    """20 个清理总失败的旧账号排到后面，之后注销的账号照样清理"""
    broken = [str(uuid.uuid4()) for _ in range(20)]
    for user_id in broken:
        sql(
            "insert into public.departed_users (user_id, departed_at) values (%s, now() - interval '1 day')",
            (user_id,),
        )
    user = await make_user()
    await direct_upload(client, user, png_bytes())
    sql("delete from auth.users where id = %s", (user.id,))

    async def storage_down_for_broken(request: httpx.Request) -> None:  # their listing fails at the HTTP boundary
        if any(user_id in request.content.decode(errors="replace") for user_id in broken):
            raise httpx.ConnectError("connection refused", request=request)

    service, storage = get_asset_service(), get_storage()
    await storage.exists(path=f"{user.id}/uploads/x")  # the storage client is made on first use
    storage._http.event_hooks["request"].append(storage_down_for_broken)
    try:
        assert await service.sweep_departed_users() == 0  # the 20 oldest fail
        assert await service.sweep_departed_users() == 1  # the newest is not held back
        assert await get_storage().list_files(prefix=f"{user.id}/uploads") == []
        assert await service.sweep_departed_users() == 0  # the broken ones take turns again
    finally:
        storage._http.event_hooks["request"].remove(storage_down_for_broken)
    assert len(sql("select user_id from public.departed_users where tried_at is not null")) == 20


async def test_an_account_created_again_with_the_same_id_is_not_swept(client, make_user):
    user = await make_user()
    sql("delete from auth.users where id = %s", (user.id,))
    sql("insert into auth.users (id, email) values (%s, %s)", (user.id, user.email))
    assert sql("select user_id from public.departed_users") == []


async def test_a_check_that_ended_without_a_verdict_has_its_file_removed_later(client, make_user):
    from lib.reaper import reap

    user = await make_user()
    asset = (await direct_upload(client, user, png_bytes())).json()["data"]
    sql("select public.finish_task(%s, 'failed')", (asset["probe_task_id"],))  # crashed: rejected in SQL
    path = storage_path(asset["id"])
    assert await get_storage().exists(path=path)
    sql("update public.assets set created_at = now() - interval '4 hours' where id = %s", (asset["id"],))
    assert (await reap()).get("abandoned_uploads") == 1
    assert not await get_storage().exists(path=path)
    assert "abandoned_uploads" not in await reap()  # once
    row = (await client.get(f"/assets/{asset['id']}", headers=user.headers)).json()["data"]
    assert row["status"] == "rejected" and row["metadata"]["file_removed"] is True


async def test_a_deleted_uploads_url_cannot_leave_a_file_behind_or_free_its_place(client, make_user, monkeypatch):
    from lib.reaper import reap

    user = await make_user()
    monkeypatch.setattr(get_settings(), "max_upload_checks_per_user", 1)
    announce = {"content_type": "image/png", "bytes": 10}
    ticket = (await client.post("/assets/uploads", json=announce, headers=user.headers)).json()["data"]
    path = storage_path(ticket["asset_id"])
    assert (await client.delete(f"/assets/{ticket['asset_id']}", headers=user.headers)).status_code == 200
    async with httpx.AsyncClient() as http:  # the URL still works for its two hours: a file with no row
        assert (await http.put(ticket["upload_url"], content=png_bytes())).status_code == 200
    assert await get_storage().exists(path=path)
    # Deleting did not make room: the deleted upload's URL still counts until it expires.
    assert (await client.post("/assets/uploads", json=announce, headers=user.headers)).status_code == 429

    sql("update public.upload_tombstones set expires_at = now() - interval '1 second' where path = %s", (path,))
    assert (await reap()).get("abandoned_uploads") == 1
    assert not await get_storage().exists(path=path)
    assert sql("select path from public.upload_tombstones where user_id = %s", (user.id,)) == []
    assert (await client.post("/assets/uploads", json=announce, headers=user.headers)).status_code == 201


async def test_uploads_at_once_cannot_pass_the_cap_together(client, make_user, monkeypatch):
    """同时来的上传不能一起越过上限：计数与登记在同一把按账户的锁下；被拒的直传不留文件"""
    user = await make_user()
    monkeypatch.setattr(get_settings(), "max_upload_checks_per_user", 2)
    body = {"content_type": "image/png", "bytes": 10}
    answers = await asyncio.gather(
        *(client.post("/assets/uploads", json=body, headers=user.headers) for _ in range(4)),
        *(direct_upload(client, user, png_bytes()) for _ in range(4)),
    )
    assert sorted(resp.status_code for resp in answers) == [201, 201] + [429] * 6
    rows = sql("select path from public.assets where user_id = %s", (user.id,))
    assert len(rows) == 2
    stored = await get_storage().list_files(prefix=f"{user.id}/uploads")
    assert set(stored) <= {row["path"] for row in rows}
