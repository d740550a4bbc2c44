"""The web app's upload with the official @supabase/storage-js against the local Storage: journey and errors."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import shutil
import subprocess
import sys
import time
import uuid

import httpx
import pytest
from PIL import Image
from storage3 import AsyncStorageClient

from lib.config import get_settings
from lib.local.storage import objects as storage_objects
from tests.conftest import ROOT
from tests.factories import connect

JS_DIR = ROOT / "tests" / "storage_js"
BUCKET = "media"
TINY_BUCKET, TINY_LIMIT = "tiny-js", 1024


def node_ready(package: str) -> bool:
    """node 与 npm 在，且 tests/storage_js 的包已装好（缺了就按 package-lock 装）"""
    if shutil.which("node") is None or shutil.which("npm") is None:
        return False
    if not (JS_DIR / "node_modules" / package).exists():
        result = subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=JS_DIR, capture_output=True, timeout=180)
        if result.returncode != 0:
            return False
    return True


@pytest.fixture(scope="module")
def storage_js(live_server):
    """运行 client.mjs 的一步（官方 storage-js），返回它输出的 JSON"""
    if not node_ready("@supabase/storage-js"):
        pytest.skip("node/npm or the @supabase/storage-js package is not available")

    async def run(step: dict, token: str = "") -> dict:
        env = {**os.environ, "SUPABASE_URL": live_server, "ACCESS_TOKEN": token or "anon"}
        env["SERVICE_KEY"] = storage_objects.service_key()
        args = ["node", "client.mjs", json.dumps(step)]
        done = await asyncio.to_thread(subprocess.run, args, cwd=JS_DIR, env=env, capture_output=True, timeout=60)
        assert done.returncode == 0, done.stderr.decode()[-2000:]
        return json.loads(done.stdout)

    return run


@pytest.fixture(scope="module")
def worker(live_server):
    """本模块专用的真实 worker 进程：完成的上传由它检查，资产变为 ready"""
    log = open(os.path.join(os.environ["SPOOL_HOME"], "worker.log"), "ab")
    proc = subprocess.Popen([sys.executable, "-m", "lib.local", "worker"], cwd=ROOT, stdout=log, stderr=log)
    yield proc
    proc.terminate()
    proc.wait(15)
    log.close()


@pytest.fixture(scope="module")
def tiny_bucket(live_server):
    """一个 1 KiB 上限的桶：用来看超出大小上限时 storage-js 得到什么"""
    with connect() as conn:
        conn.execute(
            "insert into storage.buckets (id, name, public, file_size_limit) values (%s, %s, false, %s)"
            " on conflict (id) do nothing",
            (TINY_BUCKET, TINY_BUCKET, TINY_LIMIT),
        )
    return TINY_BUCKET


def png_bytes(width: int = 24, height: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.linear_gradient("L").resize((width, height)).convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def announce(client, user, data: bytes, filename: str) -> dict:
    body = {"content_type": "image/png", "bytes": len(data), "filename": filename}
    resp = await client.post("/assets/uploads", json=body, headers=user.headers)
    assert resp.status_code == 201, resp.text
    return resp.json()["data"]


async def until_ready(client, user, asset_id: str, seconds: float = 90) -> dict:
    deadline = time.monotonic() + seconds
    while True:
        asset = (await client.get(f"/assets/{asset_id}", headers=user.headers)).json()["data"]
        if asset["status"] != "pending":
            return asset
        assert time.monotonic() < deadline, f"asset {asset_id} still pending"
        await asyncio.sleep(0.2)


def signed_upload_token(bucket: str, key: str, seconds: int) -> str:
    expires = int(time.time()) + seconds
    return storage_objects.make_token(purpose="upload", bucket=bucket, key=key, expires_at=expires)


# -- the journey -----------------------------------------------------------------------


FORMS = {
    "blob with a type": ({"as": "blob", "type": "image/png"}, None, "photo.png"),
    "file, non-ASCII name": ({"as": "file", "type": "image/png", "name": "照片 été.png"}, None, "照片 été.png"),
    "arraybuffer": ({"as": "arraybuffer"}, {"contentType": "image/png"}, "raw.png"),
    "uint8array, upsert": ({"as": "uint8array"}, {"contentType": "image/png", "upsert": True}, "Ünïcødé 写真.png"),
}


@pytest.mark.parametrize("form", FORMS.values(), ids=FORMS.keys())
async def test_web_upload_with_storage_js_then_complete_ready_and_download(client, make_user, storage_js, worker, form):
    file, options, filename = form
    user = await make_user()
    data = png_bytes()
    ticket = await announce(client, user, data, filename)

    step = {"op": "upload", "url": ticket["upload_url"], "file": {**file, "b64": b64(data)}, "options": options}
    sent = await storage_js(step, user.token)
    assert sent["error"] is None, sent
    path = sent["target"]["path"]
    assert sent["target"]["bucket"] == BUCKET and sent["target"]["token"] == ticket["token"]
    assert (ticket["bucket"], ticket["path"]) == (BUCKET, path)  # the ticket names them too: what the README uses
    assert sent["data"] == {"path": path, "fullPath": f"{BUCKET}/{path}"}

    done = await client.post(f"/assets/{ticket['asset_id']}/complete", headers=user.headers)
    assert done.status_code == 200, done.text
    asset = await until_ready(client, user, ticket["asset_id"])
    assert asset["status"] == "ready", asset
    assert (asset["mime"], asset["bytes"], asset["width"], asset["height"]) == ("image/png", len(data), 24, 16)
    assert asset["metadata"]["filename"] == filename

    async with httpx.AsyncClient() as http:
        got = await http.get(asset["download_url"])
    assert got.status_code == 200 and got.content == data and got.headers["content-type"] == "image/png"
    signed = await storage_js({"op": "sign", "bucket": BUCKET, "path": path, "expiresIn": 60})
    assert (signed["status"], signed["contentType"], base64.b64decode(signed["b64"])) == (200, "image/png", data)


async def test_an_arraybuffer_without_a_content_type_goes_as_text_and_complete_refuses_it(
    client, make_user, storage_js
):
    """storage-js 给非 Blob 的文件体默认 text/plain：Storage 会按它提供文件，所以完成时拒绝"""
    user = await make_user()
    data = png_bytes()
    ticket = await announce(client, user, data, "untyped.png")
    step = {"op": "upload", "url": ticket["upload_url"], "file": {"as": "arraybuffer", "b64": b64(data)}}
    assert (await storage_js(step, user.token))["error"] is None
    done = await client.post(f"/assets/{ticket['asset_id']}/complete", headers=user.headers)
    assert done.status_code == 422
    assert done.json()["error"]["message"] == "The file was uploaded as text/plain; upload it as image/png."


@pytest.mark.parametrize("form", ["blob", "uint8array"])
async def test_metadata_and_cache_control_sent_with_storage_js_are_in_the_objects_info(storage_js, form):
    """storage-js 的 metadata（Blob：表单字段；字节：base64 JSON 的 x-metadata 头）与 cacheControl 进入对象信息"""
    path = f"{uuid.uuid4()}/tagged.png"
    token = signed_upload_token(BUCKET, path, 60)
    file = {"as": form, "type": "image/png", "b64": b64(png_bytes())}
    metadata = {"source": "camera", "n": 2, "名前": "写真"}
    options = {"contentType": "image/png", "cacheControl": "60", "metadata": metadata}
    step = {"op": "upload", "bucket": BUCKET, "path": path, "token": token, "file": file, "options": options}
    assert (await storage_js(step))["error"] is None

    key = storage_objects.service_key()
    service = AsyncStorageClient(
        f"{get_settings().supabase_url}/storage/v1/", {"apikey": key, "Authorization": f"Bearer {key}"}
    )
    async with service:
        info = await service.from_(BUCKET).info(path)
    assert (info["metadata"], info["cache_control"], info["content_type"]) == (metadata, "max-age=60", "image/png")


# -- errors as storage-js reports them ---------------------------------------------------


def api_error(status_code: str, code: str, message: str) -> dict:
    """Supabase Storage 的错误经 storage-js：StorageApiError，HTTP 400，真正的状态在 statusCode"""
    return {
        "name": "StorageApiError",
        "message": message,
        "status": 400,
        "statusCode": status_code,
        "code": code,
        "api": True,
        "unknown": False,
    }


async def test_an_expired_upload_token_is_an_invalid_jwt(client, make_user, storage_js):
    user = await make_user()
    ticket = await announce(client, user, png_bytes(), "late.png")
    path = ticket["upload_url"].split(f"/sign/{BUCKET}/")[1].split("?")[0]
    token = signed_upload_token(BUCKET, path, -1)
    step = {"op": "upload", "bucket": BUCKET, "path": path, "token": token, "file": {"as": "blob", "b64": b64(b"x")}}
    sent = await storage_js(step, user.token)
    assert sent["error"] == api_error("400", "InvalidJWT", "jwt expired")


@pytest.mark.parametrize("upsert", [False, True])
async def test_a_second_upload_to_the_same_signed_url_is_a_duplicate(client, make_user, storage_js, upsert):
    """签名上传是否可覆盖由签发时决定（API 签发的不可覆盖）：客户端的 upsert 选项不改变它"""
    user = await make_user()
    data = png_bytes()
    ticket = await announce(client, user, data, "twice.png")
    step = {"op": "upload", "url": ticket["upload_url"], "file": {"as": "blob", "type": "image/png", "b64": b64(data)}}
    assert (await storage_js(step, user.token))["error"] is None
    again = await storage_js({**step, "options": {"upsert": upsert}}, user.token)
    assert again["error"] == api_error("409", "ResourceAlreadyExists", "The resource already exists")


SIZES = {"just over": TINY_LIMIT + 1, "far over": 8 * 1024 * 1024}


@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
@pytest.mark.parametrize("form", ["blob", "uint8array"])
async def test_a_file_over_the_size_limit_is_entity_too_large(storage_js, tiny_bucket, form, size):
    path = f"{uuid.uuid4()}/big.bin"
    token = signed_upload_token(tiny_bucket, path, 60)
    file = {"as": form, "type": "application/octet-stream", "zeros": size}
    step = {"op": "upload", "bucket": tiny_bucket, "path": path, "token": token, "file": file}
    sent = await storage_js(step)
    assert sent["error"] == api_error("413", "EntityTooLarge", "The object exceeded the maximum allowed size")


# -- names that need encoding ------------------------------------------------------------


@pytest.mark.parametrize("download", [None, True])
async def test_a_signed_download_of_a_non_ascii_name_works_through_storage_js(storage_js, live_server, download):
    """Storage 给出未编码的 signedURL，storage-js 自己再 encodeURI：已编码的名字会被编码两次"""
    path = f"{uuid.uuid4()}/uploads/été 照片 (1).png"
    data = png_bytes()
    file = {"as": "file", "type": "image/png", "name": "été 照片 (1).png", "b64": b64(data)}
    token = signed_upload_token(BUCKET, path, 60)
    sent = await storage_js({"op": "upload", "bucket": BUCKET, "path": path, "token": token, "file": file})
    assert sent["data"] == {"path": path, "fullPath": f"{BUCKET}/{path}"}, sent

    signed = await storage_js({"op": "sign", "bucket": BUCKET, "path": path, "expiresIn": 60, "download": download})
    assert (signed["status"], base64.b64decode(signed["b64"])) == (200, data), signed
    if download:
        assert signed["disposition"].startswith("attachment;") and "%E7%85%A7" in signed["disposition"]
