"""The web app's upload with the official @supabase/storage-js against the local Storage."""

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

import httpx
import pytest
from PIL import Image

from lib.local.storage import objects as storage_objects
from tests.conftest import ROOT

JS_DIR = ROOT / "tests" / "storage_js"
BUCKET = "media"


def _node_ready() -> bool:
    if shutil.which("node") is None or shutil.which("npm") is None:
        return False
    if not (JS_DIR / "node_modules" / "@supabase" / "storage-js").exists():
        result = subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=JS_DIR, capture_output=True, timeout=180)
        if result.returncode != 0:
            return False
    return True


@pytest.fixture(scope="module")
def storage_js(live_server):
    """运行 client.mjs 的一步（官方 storage-js），返回它输出的 JSON"""
    if not _node_ready():
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
