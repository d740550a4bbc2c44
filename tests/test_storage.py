"""Storage: the storage3 client against the local Storage subset, signed URLs, and the user-path guard."""

from __future__ import annotations

import asyncio
import time
import uuid

import httpx
import pytest
from storage3 import AsyncStorageClient
from storage3.exceptions import StorageApiError

from lib.config import get_settings
from lib.errors import Conflict, Forbidden, NotFound
from lib.local.storage import objects as storage_objects
from lib.storage import get_storage, user_path
from tests.factories import storage_signings, token_expiry

BUCKET = "media"


@pytest.fixture
def storage(live_server):
    return get_storage()


@pytest.fixture
def owner() -> str:
    return str(uuid.uuid4())


def raw_url(key: str) -> str:
    return f"{get_settings().supabase_url}/storage/v1/object/{BUCKET}/{key}"


def service_headers() -> dict:
    key = get_settings().supabase_service_role_key
    return {"apikey": key, "Authorization": f"Bearer {key}"}


async def test_round_trip_upload_sign_download_remove(storage, owner, tmp_path):
    path = user_path(owner, "notes", "a.bin")
    data = bytes(range(256)) * 1000
    await storage.upload_bytes(path=path, data=data, content_type="application/octet-stream", user_id=owner)

    info = await storage.info(path=path, user_id=owner)
    assert info["size"] == len(data) and info["content_type"] == "application/octet-stream"

    url = await storage.create_signed_url(path=path, expires_in=60, user_id=owner)
    assert url.startswith(f"{get_settings().supabase_url}/storage/v1/object/sign/{BUCKET}/{owner}/notes/a.bin?token=")
    async with httpx.AsyncClient() as http:
        resp = await http.get(url)
    assert resp.status_code == 200 and resp.content == data

    assert await storage.read_head(path=path, size=10) == data[:10]
    dest = tmp_path / "copy.bin"
    assert await storage.download_to(path=path, dest=dest, user_id=owner) == len(data)
    assert dest.read_bytes() == data

    assert await storage.remove(paths=[path], user_id=owner) == [path]
    assert not await storage.exists(path=path, user_id=owner)
    with pytest.raises(NotFound):
        await storage.create_signed_url(path=path, expires_in=60, user_id=owner)


async def test_upload_file_streams_from_disk_and_keeps_content_type(storage, owner, tmp_path):
    src = tmp_path / "clip.mp4"
    src.write_bytes(b"\x00" * 300_000)
    path = user_path(owner, "tasks", "clip.mp4")
    await storage.upload_file(path=path, local_file=src, content_type="video/mp4")
    info = await storage.info(path=path)
    assert info == {"path": path, "size": 300_000, "content_type": "video/mp4", "etag": info["etag"]}
    await storage.upload_file(path=path, local_file=src, content_type="video/mp4")  # upsert by default
    with pytest.raises(Conflict):
        await storage.upload_file(path=path, local_file=src, content_type="video/mp4", upsert=False)


async def test_signed_upload_url_accepts_one_upload(storage, owner):
    path = user_path(owner, "uploads", "x.png")
    ticket = await storage.create_signed_upload_url(path=path, user_id=owner)
    assert ticket["path"] == path and ticket["token"] in ticket["url"]
    async with httpx.AsyncClient() as http:
        resp = await http.put(ticket["url"], content=b"hello", headers={"content-type": "image/png"})
        assert resp.status_code == 200, resp.text
        assert resp.json()["Key"] == f"{BUCKET}/{path}"
        again = await http.put(ticket["url"], content=b"other")
    # As Supabase Storage: HTTP 400, the real status in the body
    assert again.status_code == 400 and again.json()["statusCode"] == "409" and again.json()["error"] == "Duplicate"
    info = await storage.info(path=path)
    assert info["size"] == 5 and info["content_type"] == "image/png"

    # storage3's own upload_to_signed_url (multipart) works against it too
    path2 = user_path(owner, "uploads", "y.bin")
    ticket2 = await storage.create_signed_upload_url(path=path2)
    await storage._bucket().upload_to_signed_url(path2, ticket2["token"], b"multipart body")
    assert (await storage.info(path=path2))["size"] == len(b"multipart body")


async def test_expired_or_tampered_tokens_are_refused(storage, owner):
    path = user_path(owner, "t.txt")
    await storage.upload_bytes(path=path, data=b"secret", content_type="text/plain")
    base = f"{get_settings().supabase_url}/storage/v1/object/sign/{BUCKET}/{path}"
    expired = storage_objects.make_token(purpose="download", bucket=BUCKET, key=path, expires_at=int(time.time()) - 1)
    good = (await storage.create_signed_url(path=path, expires_in=60)).split("token=")[1]
    other = storage_objects.make_token(
        purpose="download", bucket=BUCKET, key=user_path(owner, "other.txt"), expires_at=int(time.time()) + 60
    )
    upload = storage_objects.make_token(purpose="upload", bucket=BUCKET, key=path, expires_at=int(time.time()) + 60)
    async with httpx.AsyncClient() as http:
        assert (await http.get(f"{base}?token={good}")).content == b"secret"
        for token, message in [
            (expired, "jwt expired"),
            (good[:-2] + ("AA" if good[-2:] != "AA" else "BB"), "invalid signature"),
            (other, "invalid signature"),
            (upload, "invalid signature"),
            ("", "Missing token"),
        ]:
            resp = await http.get(f"{base}?token={token}")
            assert resp.status_code == 400, token
            assert resp.json() == {"statusCode": "400", "code": "InvalidJWT", "error": "InvalidJWT", "message": message}


async def test_service_key_is_required(live_server, owner):
    path = user_path(owner, "k.txt")
    async with httpx.AsyncClient() as http:
        assert (await http.get(raw_url(path))).status_code == 401
        wrong = await http.get(raw_url(path), headers={"apikey": "sb_secret_wrong", "Authorization": "Bearer x"})
    assert wrong.status_code == 400 and wrong.json()["statusCode"] == "403"
    bad = AsyncStorageClient(
        f"{get_settings().supabase_url}/storage/v1/", {"apikey": "nope", "Authorization": "Bearer nope"}
    )
    async with bad:
        with pytest.raises(StorageApiError) as err:
            await bad.from_(BUCKET).upload(path, b"x")
    assert str(err.value.status) == "403"


@pytest.mark.parametrize("key", ["..%2F..%2Fetc%2Fpasswd", "a%2F..%2F..%2Fx", "a%5Cb", "a%00b", "a%2F%2Fb", "%2Fabs"])
async def test_path_traversal_is_refused(live_server, key):
    async with httpx.AsyncClient() as http:
        resp = await http.post(raw_url(key), content=b"x", headers=service_headers())
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"] == "InvalidKey"


async def test_object_names_the_filesystem_cannot_hold_are_refused_not_half_written(live_server, owner):
    async with httpx.AsyncClient() as http:
        too_long = await http.post(raw_url(f"{owner}/{'a' * 256}"), content=b"x", headers=service_headers())
        assert (too_long.status_code, too_long.json()["error"]) == (400, "InvalidKey")
        longest = await http.post(raw_url(f"{owner}/{'b' * 255}"), content=b"x", headers=service_headers())
        assert longest.status_code == 200, longest.text  # before: stored, then a 500 writing its metadata
        # An object and a name that extends it as a folder keep apart (their metadata once collided).
        for key in (f"{owner}/c", f"{owner}/c.json/x"):
            resp = await http.post(
                raw_url(key), content=b"x", headers={**service_headers(), "content-type": "image/png"}
            )
            assert resp.status_code == 200, resp.text
            assert (await http.get(raw_url(key), headers=service_headers())).headers["content-type"] == "image/png"


@pytest.mark.parametrize(
    "name", ["100%.png", "a#b.png", "t~.png", "[1].png", "{x}.png", "a^b", "a|b", 'a"b', "a<b>", "a`b"]
)
async def test_characters_storage_refuses_in_a_key_are_refused(storage, owner, name):
    with pytest.raises(StorageApiError) as err:
        await storage._bucket().upload(user_path(owner, name), b"x")
    assert (str(err.value.status), err.value.code, err.value.message) == (
        "400",
        "InvalidKey",
        f"Invalid key: {owner}/{name}",
    )


async def test_keys_with_spaces_unicode_plus_and_question_marks_round_trip(storage, owner):
    for name in ("a b.png", "ünï 文件.png", "a+b.png", "why?.png", "it's (1) & $@=;:,!.png"):
        path = user_path(owner, name)
        await storage.upload_bytes(path=path, data=name.encode(), content_type="image/png")
        async with httpx.AsyncClient() as http:
            assert (await http.get(await storage.create_signed_url(path=path, expires_in=60))).content == name.encode()
        ticket = await storage.create_signed_upload_url(path=user_path(owner, "up " + name))
        await storage._bucket().upload_to_signed_url(ticket["path"], ticket["token"], b"up")
        assert (await storage.info(path=ticket["path"]))["size"] == 2


@pytest.mark.parametrize("odd", [{"offset": "x"}, {"limit": -1}, {"sortBy": "name"}, {"offset": 1.5}])
async def test_listing_with_odd_paging_is_a_400(live_server, owner, odd):
    async with httpx.AsyncClient() as http:
        url = f"{get_settings().supabase_url}/storage/v1/object/list/{BUCKET}"
        resp = await http.post(url, json={"prefix": owner, **odd}, headers=service_headers())
    assert (resp.status_code, resp.json()["error"]) == (400, "InvalidRequest")


async def test_user_path_guard(storage, owner):
    someone_else = str(uuid.uuid4())
    path = user_path(someone_else, "private.png")
    for call in (
        storage.create_signed_url(path=path, expires_in=60, user_id=owner),
        storage.remove(paths=[path], user_id=owner),
        storage.info(path=path, user_id=owner),
    ):
        with pytest.raises(Forbidden):
            await call
    for bad in ("uploads/x.png", f"{owner}/../{someone_else}/x", f"{owner}", "not-a-uuid/x"):
        with pytest.raises(Forbidden):
            await storage.create_signed_upload_url(path=bad)


async def test_missing_object_and_bucket(storage, owner, monkeypatch, tmp_path):
    missing = user_path(owner, "nothing")
    assert await storage.info(path=missing) is None
    async with httpx.AsyncClient() as http:
        resp = await http.get(raw_url(missing), headers=service_headers())
        assert resp.status_code == 400  # as Supabase Storage answers every error it raises itself
        assert resp.json() == {
            "statusCode": "404",
            "code": "NoSuchKey",
            "error": "not_found",
            "message": "Object not found",
        }
        resp = await http.get(raw_url("x").replace(f"/{BUCKET}/", "/nobucket/"), headers=service_headers())
    assert resp.json()["statusCode"] == "404" and resp.json()["message"] == "Bucket not found"
    # Our direct reads go by the status in the body too: an object deleted after its URL was signed is NotFound.
    gone = user_path(owner, "gone.bin")
    await storage.upload_bytes(path=gone, data=b"x", content_type="application/octet-stream")
    signed = await storage._signed_url(gone, 60, None)
    await storage.remove(paths=[gone])

    async def stale_url(*args):
        return signed

    monkeypatch.setattr(storage, "_signed_url", stale_url)
    with pytest.raises(NotFound):
        await storage.download_to(path=gone, dest=tmp_path / "x")
    with pytest.raises(NotFound):
        await storage.read_head(path=gone)
    assert not list(tmp_path.iterdir())


async def test_public_url_is_used_for_browser_urls(storage, owner, monkeypatch):
    path = user_path(owner, "p.txt")
    await storage.upload_bytes(path=path, data=b"p", content_type="text/plain")
    monkeypatch.setattr(get_settings(), "public_url", "https://spool.example.test")
    url = await storage.create_signed_url(path=path, expires_in=60)
    assert url.startswith(f"https://spool.example.test/storage/v1/object/sign/{BUCKET}/{path}?token=")


async def test_the_resumable_endpoint_is_on_storages_direct_hostname_in_the_cloud(storage, monkeypatch):
    assert storage.resumable_url() == f"{get_settings().supabase_url}/storage/v1/upload/resumable/sign"
    monkeypatch.setattr(get_settings(), "public_url", "https://spool.example.test")
    assert storage.resumable_url() == "https://spool.example.test/storage/v1/upload/resumable/sign"
    monkeypatch.setattr(get_settings(), "public_url", None)
    monkeypatch.setattr(get_settings(), "supabase_url", "https://abcd.supabase.co")
    assert storage.resumable_url() == "https://abcd.storage.supabase.co/storage/v1/upload/resumable/sign"


async def test_signed_urls_stay_out_of_the_logs(storage, owner, caplog):
    import logging

    from lib.logs import configure_logging

    configure_logging("INFO")  # what every entry point does
    caplog.set_level(logging.INFO)
    path = user_path(owner, "secret.bin")
    await storage.upload_bytes(path=path, data=b"x" * 64, content_type="application/octet-stream")
    assert await storage.read_head(path=path, size=8) == b"x" * 8
    assert "token=" not in caplog.text  # httpx writes each request's URL at INFO: a signed one is a key to the file


async def test_move_and_copy_through_storage3(storage, owner):
    bucket = storage._bucket()
    src, moved, copied = user_path(owner, "m", "a.png"), user_path(owner, "m", "b.png"), user_path(owner, "c.png")
    await storage.upload_bytes(path=src, data=b"png!", content_type="image/png")
    assert await bucket.copy(src, copied) == {"Key": f"{BUCKET}/{copied}"}
    assert await bucket.move(src, moved) == {"message": "Successfully moved"}
    assert not await storage.exists(path=src)
    for path in (moved, copied):
        assert await storage.info(path=path) == {
            "path": path,
            "size": 4,
            "content_type": "image/png",
            "etag": (await storage.info(path=path))["etag"],
        }
    with pytest.raises(StorageApiError) as err:
        await bucket.move(moved, copied)  # the destination exists
    assert (str(err.value.status), err.value.code) == ("409", "Duplicate")
    with pytest.raises(StorageApiError) as err:
        await bucket.copy(src, user_path(owner, "d.png"))  # the source is gone
    assert (str(err.value.status), err.value.code) == ("404", "not_found")


async def test_public_url_of_a_private_bucket_is_refused_as_bucket_not_found(storage, owner):
    path = user_path(owner, "pub.txt")
    await storage.upload_bytes(path=path, data=b"private", content_type="text/plain")
    url = await storage._bucket().get_public_url(path)
    async with httpx.AsyncClient() as http:
        for headers in ({}, service_headers()):  # a browser sends no key; a key does not open a private bucket
            resp = await http.get(url, headers=headers)
            assert resp.status_code == 400, resp.text
            assert resp.json() == {
                "statusCode": "404",
                "code": "NoSuchBucket",
                "error": "Bucket not found",
                "message": "Bucket not found",
            }
    # storage3's exists() tells a missing object from a missing bucket by the error
    with pytest.raises(StorageApiError):
        await storage._client.from_("nobucket").exists(path)


async def test_downloads_carry_the_objects_etag_and_answer_if_none_match_with_304(storage, owner):
    path = user_path(owner, "e.txt")
    await storage.upload_bytes(path=path, data=b"etag me", content_type="text/plain")
    etag = (await storage.info(path=path))["etag"]
    url = await storage.create_signed_url(path=path, expires_in=60)
    async with httpx.AsyncClient() as http:
        for get in (
            lambda h: http.get(url, headers=h),
            lambda h: http.get(raw_url(path), headers={**service_headers(), **h}),
        ):
            resp = await get({})
            assert resp.status_code == 200 and resp.headers["etag"] == etag
            assert resp.headers["content-type"] == "text/plain"  # as stored, no charset added
            again = await get({"If-None-Match": etag})
            assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == etag
            assert (await get({"If-None-Match": '"other"'})).status_code == 200


@pytest.mark.parametrize("ranges", ["bytes=0-1,4-5", "bytes=abc", "bytes=5-2", "bytes=20-30"])
async def test_multiple_or_invalid_ranges_are_416(storage, owner, ranges):
    path = user_path(owner, "r.bin")
    await storage.upload_bytes(path=path, data=b"0123456789", content_type="application/octet-stream")
    async with httpx.AsyncClient() as http:
        resp = await http.get(raw_url(path), headers={**service_headers(), "Range": ranges})
        assert (resp.status_code, resp.headers["content-range"]) == (416, "bytes */10")
        one = await http.get(raw_url(path), headers={**service_headers(), "Range": "bytes=2-4"})
    assert (one.status_code, one.headers["content-range"], one.content) == (206, "bytes 2-4/10", b"234")


async def test_listing_orders_searches_and_sorts_as_storage_does(storage, owner):
    bucket = storage._bucket()
    for name in ("b.png", "A.png", "a-b/x.png", "a/y.png", "c.png", "Cat/z.png"):
        await storage.upload_bytes(path=f"{owner}/{name}", data=b"x", content_type="image/png")
        await asyncio.sleep(0.01)  # distinct modification times for the updated_at sort

    async def names(**options) -> list[str]:
        return [item["name"] for item in await bucket.list(owner, options)]

    # By name, folders among files, case-insensitively ('-' sorts before the '/' that ends a folder's name).
    assert await names() == ["a-b", "A.png", "a", "b.png", "c.png", "Cat"]
    assert await names(sortBy={"column": "name", "order": "desc"}) == ["Cat", "c.png", "b.png", "a", "A.png", "a-b"]
    # search: names starting with it, in any case (not names that merely contain it).
    assert await names(search="c") == ["c.png", "Cat"]
    assert await names(search="png") == []
    # Another column: folders first (by name), then the files by that column.
    assert await names(sortBy={"column": "updated_at", "order": "asc"}) == [
        "a",
        "a-b",
        "Cat",
        "b.png",
        "A.png",
        "c.png",
    ]
    assert await names(sortBy={"column": "created_at", "order": "desc"}) == [
        "Cat",
        "a-b",
        "a",
        "c.png",
        "A.png",
        "b.png",
    ]
    assert await names(limit=2, offset=1) == ["A.png", "a"]


async def test_download_urls_are_handed_out_again_while_they_keep_their_promised_lifetime(storage, owner):
    paths = [user_path(owner, "again", name) for name in ("a.bin", "b.bin")]
    for path in paths:
        await storage.upload_bytes(path=path, data=path.encode(), content_type="application/octet-stream")
    with storage_signings() as signings:
        first = await storage.create_signed_urls(paths=paths, expires_in=3600)
        again = await storage.create_signed_urls(paths=list(reversed(paths)), expires_in=3600)
        assert again == first and len(signings) == 1  # a poll of the same page costs no storage request
        for url in again.values():
            assert token_expiry(url) >= time.time() + 3600 - 1  # valid for the whole lifetime asked for
        short = await storage.create_signed_urls(paths=paths[:1], expires_in=60)
        assert len(signings) == 2 and short[paths[0]] != first[paths[0]]  # another lifetime, another URL
        assert token_expiry(short[paths[0]]) <= time.time() + 2 * 60
    async with httpx.AsyncClient() as http:
        for path, url in first.items():  # each path its own URL
            assert (await http.get(url)).content == path.encode()


async def test_a_url_is_signed_again_before_less_than_its_promised_lifetime_is_left(storage, owner):
    path = user_path(owner, "short.bin")
    await storage.upload_bytes(path=path, data=b"s", content_type="application/octet-stream")
    with storage_signings() as signings:
        first = await storage.create_signed_urls(paths=[path], expires_in=2)
        await asyncio.sleep(1.1)  # past the half of its promised lifetime it may be handed out for
        again = await storage.create_signed_urls(paths=[path], expires_in=2)
    assert len(signings) == 2 and token_expiry(again[path]) >= time.time() + 2 - 1
    assert token_expiry(again[path]) > token_expiry(first[path])


async def test_a_removed_file_is_not_handed_out_from_the_remembered_urls(storage, owner):
    path = user_path(owner, "removed.bin")
    await storage.upload_bytes(path=path, data=b"r", content_type="application/octet-stream")
    assert (await storage.create_signed_urls(paths=[path]))[path]
    await storage.remove(paths=[path])
    assert await storage.create_signed_urls(paths=[path]) == {path: None}
    await storage.upload_bytes(path=path, data=b"r", content_type="application/octet-stream")
    assert (await storage.create_signed_urls(paths=[path]))[path]  # signed again once the file is back
