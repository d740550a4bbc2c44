"""Resumable signed uploads with the real tus-js-client against the local Storage: resume, complete, refusals."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import random
import subprocess
import time
import uuid

import httpx
import pytest
from PIL import Image

from lib.assets import get_asset_service
from lib.config import get_settings
from lib.local.storage import objects as storage_objects
from tests import test_storage_js as storage_js
from tests.conftest import ROOT
from tests.factories import connect
from tests.test_storage_js import BUCKET, announce, signed_upload_token, until_ready

JS_DIR = ROOT / "tests" / "storage_js"
worker, tiny_bucket = storage_js.worker, storage_js.tiny_bucket  # their fixtures: a worker, a 1 KiB bucket
CHUNK = 64 * 1024
TUS = {"Tus-Resumable": "1.0.0"}


@pytest.fixture(scope="module")
def tus_js(live_server, tmp_path_factory):
    """运行 tus.mjs 的一步（真实的 tus-js-client），返回它输出的 JSON"""
    if not storage_js.node_ready("tus-js-client"):
        pytest.skip("node/npm or the tus-js-client package is not available")
    folder = tmp_path_factory.mktemp("tus")

    async def run(data: bytes, **step) -> dict:
        file = folder / f"{uuid.uuid4()}.bin"
        file.write_bytes(data)
        step = {"endpoint": f"{live_server}/storage/v1/upload/resumable/sign", "chunkSize": CHUNK, **step}
        args = ["node", "tus.mjs", json.dumps({"file": str(file), **step})]
        done = await asyncio.to_thread(subprocess.run, args, cwd=JS_DIR, capture_output=True, timeout=60)
        assert done.returncode == 0, done.stderr.decode()[-2000:]
        return json.loads(done.stdout)

    return run


def noisy_png(width: int = 256, height: int = 256) -> bytes:
    """不可压缩的 PNG（约 200 KB）：分成好几块上传"""
    rng = random.Random(7)
    image = Image.frombytes("RGB", (width, height), bytes(rng.getrandbits(8) for _ in range(width * height * 3)))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def metadata(bucket: str, path: str, content_type: str = "application/octet-stream") -> str:
    pairs = {"bucketName": bucket, "objectName": path, "contentType": content_type}
    return ",".join(f"{k} {base64.b64encode(v.encode()).decode()}" for k, v in pairs.items())


async def create(
    http: httpx.AsyncClient, base: str, token: str, path: str, length: int, bucket: str = BUCKET, origin: str = ""
):
    headers = {**TUS, "x-signature": token, "Upload-Length": str(length), "Upload-Metadata": metadata(bucket, path)}
    headers |= {"Origin": origin} if origin else {}
    return await http.post(f"{base}/storage/v1/upload/resumable/sign", headers=headers)


def patch_headers(token: str, offset: int) -> dict:
    content_type = "application/offset+octet-stream"
    return {**TUS, "x-signature": token, "Upload-Offset": str(offset), "Content-Type": content_type}


def partials(bucket: str, path: str) -> list[str]:
    folder = storage_objects.partials_dir(bucket, path)
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


# -- the journey -----------------------------------------------------------------------


async def test_an_interrupted_upload_resumes_from_the_servers_offset_then_completes_ready(
    client, make_user, tus_js, worker, live_server
):
    user = await make_user()
    data = noisy_png()
    assert len(data) > 3 * CHUNK
    ticket = await announce(client, user, data, "noise.png")
    assert ticket["resumable_url"] == f"{get_settings().supabase_url}/storage/v1/upload/resumable/sign"
    step = {"token": ticket["token"], "bucket": ticket["bucket"], "path": ticket["path"], "contentType": "image/png"}

    first = await tus_js(data, **step, stopAfter=2 * CHUNK)  # the POST carries one chunk, a PATCH the next
    assert first["error"] is None and not first["done"] and first["accepted"] == 2 * CHUNK, first
    assert first["patchOffsets"] == [CHUNK]
    async with httpx.AsyncClient() as http:  # nothing partial is visible as an object
        info = await http.get(
            f"{live_server}/storage/v1/object/info/{BUCKET}/{ticket['path']}",
            headers={"Authorization": f"Bearer {storage_objects.service_key()}"},
        )
    assert info.json()["statusCode"] == "404"
    early = await client.post(f"/assets/{ticket['asset_id']}/complete", headers=user.headers)
    assert early.status_code == 409

    second = await tus_js(data, **step, uploadUrl=first["url"])  # a new client, from the URL alone
    assert second["error"] is None and second["done"], second
    assert second["patchOffsets"][0] == 2 * CHUNK and len(second["patchOffsets"]) >= 2

    done = await client.post(f"/assets/{ticket['asset_id']}/complete", headers=user.headers)
    assert done.status_code == 200, done.text
    asset = await until_ready(client, user, ticket["asset_id"])
    assert asset["status"] == "ready", asset
    assert (asset["mime"], asset["bytes"], asset["width"], asset["height"]) == ("image/png", len(data), 256, 256)
    async with httpx.AsyncClient() as http:
        got = await http.get(asset["download_url"])
    assert got.status_code == 200 and got.content == data and got.headers["content-type"] == "image/png"
    assert got.headers["cache-control"] == "max-age=3600"


# -- refusals --------------------------------------------------------------------------


async def test_an_upload_over_the_buckets_limit_is_refused_at_creation(tus_js, tiny_bucket):
    path = f"{uuid.uuid4()}/big.bin"
    token = signed_upload_token(tiny_bucket, path, 60)
    sent = await tus_js(b"\0" * 2048, token=token, bucket=tiny_bucket, path=path, contentType="application/zip")
    assert sent["error"]["method"] == "POST" and sent["error"]["status"] == 413, sent
    assert sent["error"]["body"] == "Maximum size exceeded" and sent["url"] is None
    assert partials(tiny_bucket, path) == []


async def test_an_upload_over_max_upload_bytes_is_refused_from_its_upload_length(live_server):
    path = f"{uuid.uuid4()}/huge.mp4"
    token = signed_upload_token(BUCKET, path, 60)
    async with httpx.AsyncClient() as http:
        resp = await create(http, live_server, token, path, get_settings().max_upload_bytes + 1)
    assert (resp.status_code, resp.text) == (413, "Maximum size exceeded")
    assert partials(BUCKET, path) == []


async def test_bytes_past_the_upload_length_are_refused_while_receiving(live_server):
    path = f"{uuid.uuid4()}/short.bin"
    token = signed_upload_token(BUCKET, path, 60)

    async def body():  # no Content-Length: the limit is kept while the bytes arrive
        yield b"a" * 8
        yield b"b" * 8

    async with httpx.AsyncClient() as http:
        location = (await create(http, live_server, token, path, 10)).headers["location"]
        resp = await http.patch(location, headers=patch_headers(token, 0), content=body())
        assert resp.status_code == 413 and resp.text == "upload's size exceeded"
        head = await http.head(location, headers={**TUS, "x-signature": token})
    assert int(head.headers["upload-offset"]) <= 10
    assert not storage_objects.object_file(BUCKET, path).exists()


async def test_an_expired_token_is_refused(tus_js, live_server):
    path = f"{uuid.uuid4()}/late.bin"
    sent = await tus_js(b"x" * 100, token=signed_upload_token(BUCKET, path, -1), bucket=BUCKET, path=path)
    assert (sent["error"]["status"], sent["error"]["body"]) == (400, "jwt expired"), sent

    token = signed_upload_token(BUCKET, path, 60)
    late = signed_upload_token(BUCKET, path, -1)
    async with httpx.AsyncClient() as http:  # an upload begun in time cannot go on with an expired token
        location = (await create(http, live_server, token, path, 100)).headers["location"]
        head = await http.head(location, headers={**TUS, "x-signature": late})
        patch = await http.patch(location, headers=patch_headers(late, 0), content=b"x" * 100)
        unsigned = {k: v for k, v in patch_headers(token, 0).items() if k != "x-signature"}
        missing = await http.patch(location, headers=unsigned, content=b"x" * 100)
    assert head.status_code == 400 and (patch.status_code, patch.text) == (400, "jwt expired")
    assert (missing.status_code, missing.text) == (400, "Missing x-signature header")


async def test_a_token_for_another_object_is_refused(live_server):
    path = f"{uuid.uuid4()}/mine.bin"
    other = signed_upload_token(BUCKET, f"{uuid.uuid4()}/theirs.bin", 60)
    async with httpx.AsyncClient() as http:
        resp = await create(http, live_server, other, path, 10)
    assert (resp.status_code, resp.text) == (400, "invalid signature")


async def test_a_used_token_is_refused_as_a_duplicate(tus_js):
    path = f"{uuid.uuid4()}/once.bin"
    token = signed_upload_token(BUCKET, path, 60)
    step = {"token": token, "bucket": BUCKET, "path": path}
    assert (await tus_js(b"first" * 10, **step))["done"]
    again = await tus_js(b"second" * 10, **step)
    assert (again["error"]["status"], again["error"]["body"]) == (409, "The resource already exists"), again
    assert storage_objects.object_file(BUCKET, path).read_bytes() == b"first" * 10


async def test_a_patch_at_a_stale_offset_is_a_409_and_changes_nothing(live_server):
    path = f"{uuid.uuid4()}/stale.bin"
    token = signed_upload_token(BUCKET, path, 60)
    async with httpx.AsyncClient() as http:
        location = (await create(http, live_server, token, path, 30)).headers["location"]
        ok = await http.patch(location, headers=patch_headers(token, 0), content=b"a" * 10)
        stale = await http.patch(location, headers=patch_headers(token, 0), content=b"b" * 10)
        head = await http.head(location, headers={**TUS, "x-signature": token})
    assert ok.status_code == 204 and ok.headers["upload-offset"] == "10"
    assert (stale.status_code, stale.text) == (409, "Upload-Offset conflict")
    assert head.headers["upload-offset"] == "10" and head.headers["upload-length"] == "30"


async def held_body(started: asyncio.Event, go_on: asyncio.Event):
    """PATCH 的正文：先送 10 字节，set started，等 go_on 后再送 10 字节"""
    yield b"a" * 10
    started.set()
    await go_on.wait()
    yield b"a" * 10


async def test_a_patch_while_another_is_writing_is_a_409(live_server):
    path = f"{uuid.uuid4()}/race.bin"
    token = signed_upload_token(BUCKET, path, 60)
    started, go_on = asyncio.Event(), asyncio.Event()

    async with httpx.AsyncClient() as http:
        location = (await create(http, live_server, token, path, 20)).headers["location"]
        first = asyncio.create_task(
            http.patch(location, headers=patch_headers(token, 0), content=held_body(started, go_on))
        )
        await started.wait()
        await asyncio.sleep(0.3)  # the first PATCH's bytes are on their way
        second = await http.patch(location, headers=patch_headers(token, 0), content=b"b" * 20)
        go_on.set()
        first = await first
    assert (second.status_code, second.text) == (409, "Upload-Offset conflict")
    assert first.status_code == 204 and first.headers["tus-complete"] == "1"
    assert storage_objects.object_file(BUCKET, path).read_bytes() == b"a" * 20


# -- what is kept, what is removed -----------------------------------------------------


async def test_bytes_received_before_a_disconnect_are_kept(live_server):
    path = f"{uuid.uuid4()}/cut.bin"
    token = signed_upload_token(BUCKET, path, 60)

    async def cut():
        yield b"a" * 1000
        await asyncio.sleep(0.3)
        raise ConnectionError("the line dropped")

    async with httpx.AsyncClient() as http:
        location = (await create(http, live_server, token, path, 5000)).headers["location"]
        with pytest.raises(ConnectionError):
            await http.patch(location, headers=patch_headers(token, 0), content=cut())
        deadline = time.monotonic() + 10
        while True:
            head = await http.head(location, headers={**TUS, "x-signature": token})
            if head.headers["upload-offset"] == "1000" or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        assert head.headers["upload-offset"] == "1000"
        rest = await http.patch(location, headers=patch_headers(token, 1000), content=b"b" * 4000)
    assert rest.status_code == 204
    assert storage_objects.object_file(BUCKET, path).read_bytes() == b"a" * 1000 + b"b" * 4000


async def test_an_abandoned_partial_upload_is_removed_by_the_reapers_sweep(client, make_user, tus_js):
    user = await make_user()
    data = noisy_png()
    ticket = await announce(client, user, data, "abandoned.png")
    step = {"token": ticket["token"], "bucket": ticket["bucket"], "path": ticket["path"], "contentType": "image/png"}
    assert not (await tus_js(data, **step, stopAfter=CHUNK))["done"]
    assert len(partials(BUCKET, ticket["path"])) == 1
    with connect() as conn:  # its URL expired and the margin after it passed
        backdate = "update public.assets set created_at = now() - interval '4 hours' where id = %s"
        conn.execute(backdate, (ticket["asset_id"],))
    assert await get_asset_service().sweep_expired_uploads() >= 1
    assert partials(BUCKET, ticket["path"]) == []


async def test_a_terminated_upload_is_gone(live_server):
    path = f"{uuid.uuid4()}/cancel.bin"
    token = signed_upload_token(BUCKET, path, 60)
    async with httpx.AsyncClient() as http:
        location = (await create(http, live_server, token, path, 30)).headers["location"]
        deleted = await http.delete(location, headers={**TUS, "x-signature": token})
        head = await http.head(location, headers={**TUS, "x-signature": token})
    assert deleted.status_code == 204 and head.status_code == 404
    assert partials(BUCKET, path) == []


async def test_options_names_the_protocol_and_the_largest_upload(live_server):
    async with httpx.AsyncClient() as http:
        resp = await http.options(f"{live_server}/storage/v1/upload/resumable/sign")
    assert resp.status_code == 204
    assert resp.headers["tus-version"] == "1.0.0" and resp.headers["tus-resumable"] == "1.0.0"
    assert set(resp.headers["tus-extension"].split(",")) >= {"creation", "creation-with-upload", "termination"}
    assert resp.headers["tus-max-size"] == str(get_settings().max_upload_bytes)
    assert "x-signature" in resp.headers["access-control-allow-headers"].lower()


async def test_a_partial_upload_whose_token_expired_goes_at_the_next_creation(live_server):
    path = f"{uuid.uuid4()}/lapsed.bin"
    expires = int(time.time()) + 2  # a whole second at least to create it in, wherever in the second this starts
    token = storage_objects.make_token(purpose="upload", bucket=BUCKET, key=path, expires_at=expires)
    async with httpx.AsyncClient() as http:
        assert (await create(http, live_server, token, path, 30)).status_code == 201
        assert len(partials(BUCKET, path)) == 1
        while time.time() <= expires:  # until its token expired: it can never be resumed
            await asyncio.sleep(0.05)
        other = f"{uuid.uuid4()}/next.bin"
        assert (await create(http, live_server, signed_upload_token(BUCKET, other, 60), other, 30)).status_code == 201
    assert partials(BUCKET, path) == []


async def test_an_empty_upload_is_an_empty_object_at_creation(live_server):
    path = f"{uuid.uuid4()}/empty.bin"
    async with httpx.AsyncClient() as http:  # tus-js-client sends no PATCH for an empty file
        resp = await create(http, live_server, signed_upload_token(BUCKET, path, 60), path, 0)
    assert resp.status_code == 201
    assert storage_objects.object_file(BUCKET, path).read_bytes() == b""


async def test_a_patch_to_a_finished_upload_changes_nothing(live_server):
    path = f"{uuid.uuid4()}/finished.bin"
    token = signed_upload_token(BUCKET, path, 60)
    async with httpx.AsyncClient() as http:
        location = (await create(http, live_server, token, path, 10)).headers["location"]
        assert (await http.patch(location, headers=patch_headers(token, 0), content=b"a" * 10)).status_code == 204
        again = await http.patch(location, headers=patch_headers(token, 10), content=b"")
        head = await http.head(location, headers={**TUS, "x-signature": token})
    assert again.status_code == 204 and again.headers["upload-offset"] == "10"
    assert head.headers["upload-offset"] == "10"
    assert storage_objects.object_file(BUCKET, path).read_bytes() == b"a" * 10


async def test_a_browser_may_read_the_location_and_the_offset(live_server):
    path = f"{uuid.uuid4()}/cors.bin"
    origin = get_settings().cors_origins[0]
    async with httpx.AsyncClient() as http:
        resp = await create(http, live_server, signed_upload_token(BUCKET, path, 60), path, 10, origin=origin)
    assert resp.status_code == 201 and resp.headers["access-control-allow-origin"] == origin
    exposed = {h.strip().lower() for h in resp.headers["access-control-expose-headers"].split(",")}
    assert {"location", "upload-offset", "upload-length", "tus-resumable"} <= exposed


async def test_upload_length_and_offset_other_than_ascii_digits_are_refused(live_server):
    path = f"{uuid.uuid4()}/digits.bin"
    token = signed_upload_token(BUCKET, path, 60)
    base = {**TUS, "x-signature": token, "Upload-Metadata": metadata(BUCKET, path)}
    endpoint = f"{live_server}/storage/v1/upload/resumable/sign"
    async with httpx.AsyncClient() as http:
        superscript = await http.post(endpoint, headers={**base, "Upload-Length": b"\xb2"})  # "²" is a digit to str
        huge = await http.post(endpoint, headers={**base, "Upload-Length": "9" * 5000})
        location = (await create(http, live_server, token, path, 10)).headers["location"]
        offset = await http.patch(location, headers={**patch_headers(token, 0), "Upload-Offset": b"\xb2"}, content=b"a")
    assert (superscript.status_code, superscript.text) == (400, "Upload-Length or Upload-Defer-Length header required")
    assert (huge.status_code, huge.text) == (413, "Maximum size exceeded")
    assert (offset.status_code, offset.text) == (400, "Invalid Upload-Offset")


async def test_metadata_served_back_as_headers_cannot_break_the_download(live_server):
    path = f"{uuid.uuid4()}/headers.bin"
    token = signed_upload_token(BUCKET, path, 60)

    def meta(content_type: str, cache: str) -> str:
        pairs = {"bucketName": BUCKET, "objectName": path, "contentType": content_type, "cacheControl": cache}
        return ",".join(f"{k} {base64.b64encode(v.encode()).decode()}" for k, v in pairs.items())

    endpoint = f"{live_server}/storage/v1/upload/resumable/sign"
    headers = {**TUS, "x-signature": token, "Upload-Length": "3"}
    async with httpx.AsyncClient() as http:
        bad_type = await http.post(endpoint, headers={**headers, "Upload-Metadata": meta("image/png\u4e2d", "60")})
        split = await http.post(endpoint, headers={**headers, "Upload-Metadata": meta("image/png\r\nX-A: b", "60")})
        created = await http.post(endpoint, headers={**headers, "Upload-Metadata": meta("image/png", "\u0663")})
        assert created.status_code == 201, created.text
        sent = await http.patch(created.headers["location"], headers=patch_headers(token, 0), content=b"abc")
        got = await http.get(
            f"{live_server}/storage/v1/object/{BUCKET}/{path}",
            headers={"Authorization": f"Bearer {storage_objects.service_key()}"},
        )
    assert (bad_type.status_code, split.status_code, sent.status_code) == (400, 400, 204)
    assert got.status_code == 200 and got.content == b"abc" and got.headers["cache-control"] == "no-cache"


async def test_a_patch_whose_upload_was_removed_meanwhile_is_a_404(live_server):
    path = f"{uuid.uuid4()}/removed.bin"
    token = signed_upload_token(BUCKET, path, 60)
    started, go_on = asyncio.Event(), asyncio.Event()

    key = storage_objects.service_key()
    async with httpx.AsyncClient() as http:
        location = (await create(http, live_server, token, path, 20)).headers["location"]
        first = asyncio.create_task(
            http.patch(location, headers=patch_headers(token, 0), content=held_body(started, go_on))
        )
        await started.wait()
        await asyncio.sleep(0.3)  # the first bytes are written when the name is removed (as the reaper's sweep does)
        removed = await http.request(
            "DELETE",
            f"{live_server}/storage/v1/object/{BUCKET}",
            json={"prefixes": [path]},
            headers={"Authorization": f"Bearer {key}"},
        )
        go_on.set()
        first = await first
    assert removed.status_code == 200
    assert (first.status_code, first.text) == (404, "The file for this url was not found")
    assert partials(BUCKET, path) == [] and not storage_objects.object_file(BUCKET, path).exists()
