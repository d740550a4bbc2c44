"""The Storage REST routes storage3 calls (specific prefixes before /object/{bucket})."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute

from lib.local.storage.objects import (
    SIGNED_UPLOAD_SECONDS,
    TMP_PREFIX,
    StorageError,
    bucket_limit,
    bucket_not_found,
    bucket_row,
    check_bucket,
    check_token,
    duplicate,
    invalid_key,
    make_token,
    meta_file,
    object_file,
    partials_dir,
    read_meta,
    require_service_key,
    storage_root,
    write_meta,
)
from lib.local.storage.uploads import expires_in, file_response, json_body, signed_path, store_upload, upsert_header


class StorageRoute(APIRoute):
    """把存储错误（与请求校验错误）写成 Storage 的错误形状，而不是产品的信封"""

    def error_response(self, exc: StorageError) -> Response:
        """错误的响应（子类可换成别的形状）"""
        return exc.response()

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def route(request: Request):
            try:
                return await handler(request)
            except StorageError as exc:
                return self.error_response(exc)
            except RequestValidationError as exc:
                return self.error_response(StorageError(400, "InvalidRequest", str(exc.errors()[:1])))

        return route


LIST_LIMIT = 1500  # Storage's most entries in one listing

router = APIRouter(prefix="/storage/v1", tags=["Local"], route_class=StorageRoute, include_in_schema=False)


@router.post("/object/upload/sign/{bucket}/{key:path}")
async def create_signed_upload_url(bucket: str, key: str, request: Request):
    """创建签名上传 URL（两小时有效）"""
    require_service_key(request)
    await bucket_limit(bucket)
    object_file(bucket, key)
    token = make_token(
        purpose="upload",
        bucket=bucket,
        key=key,
        upsert=upsert_header(request),
        expires_at=int(time.time()) + SIGNED_UPLOAD_SECONDS,
    )
    return {"url": f"/object/upload/sign/{bucket}/{quote(key)}?token={token}", "token": token}


@router.put("/object/upload/sign/{bucket}/{key:path}")
async def upload_to_signed_url(bucket: str, key: str, request: Request, token: str | None = None):
    """凭签名令牌上传（无需密钥）"""
    claims = check_token(token, purpose="upload", bucket=bucket, key=key)
    return await store_upload(request, bucket, key, upsert=bool(claims.get("u")))


@router.post("/object/sign/{bucket}/{key:path}")
async def create_signed_url(bucket: str, key: str, request: Request):
    """创建签名下载 URL"""
    require_service_key(request)
    body = await json_body(request)
    seconds = expires_in(body)
    await bucket_limit(bucket)
    read_meta(bucket, key)
    return {"signedURL": signed_path(bucket, key, seconds)}


@router.post("/object/sign/{bucket}")
async def create_signed_urls(bucket: str, request: Request):
    """批量创建签名下载 URL"""
    require_service_key(request)
    body = await json_body(request)
    seconds = expires_in(body)
    await bucket_limit(bucket)
    items = []
    for key in body.get("paths") or []:
        try:
            read_meta(bucket, str(key))
            items.append({"path": key, "signedURL": signed_path(bucket, key, seconds), "error": None})
        except StorageError as exc:
            items.append({"path": key, "signedURL": None, "error": exc.message})
    return items


@router.get("/object/sign/{bucket}/{key:path}")
async def download_signed(
    bucket: str, key: str, request: Request, token: str | None = None, download: str | None = None
):
    """凭签名令牌下载（流式，支持 Range）"""
    check_token(token, purpose="download", bucket=bucket, key=key)
    return file_response(request, bucket, key, download)


@router.get("/object/info/{bucket}/{key:path}")
async def object_info(bucket: str, key: str, request: Request):
    """对象信息"""
    require_service_key(request)
    await bucket_limit(bucket)
    return read_meta(bucket, key)


@router.post("/object/list/{bucket}")
async def list_objects(bucket: str, request: Request):
    """列出一个前缀（文件夹）下的对象，排序、搜索与分页同 Storage 的 storage.search"""
    require_service_key(request)
    body = await json_body(request)
    await bucket_limit(bucket)
    sort_by, offset, limit = body.get("sortBy") or {}, body.get("offset") or 0, body.get("limit") or 100
    if not isinstance(sort_by, dict) or not all(type(v) is int and v >= 0 for v in (offset, limit)):
        raise StorageError(400, "InvalidRequest", "offset and limit must be whole numbers >= 0, sortBy an object")
    prefix = str(body.get("prefix") or "").strip("/")
    folder = object_file(bucket, prefix) if prefix else (storage_root() / check_bucket(bucket))
    names = [p.name for p in folder.iterdir() if not p.name.startswith(TMP_PREFIX)] if folder.is_dir() else []
    search = str(body.get("search") or "").lower()
    entries = [_entry(bucket, prefix, folder, name) for name in names if name.lower().startswith(search)]
    column = str(sort_by.get("column") or "name").lower()
    descending = str(sort_by.get("order") or "asc").lower() != "asc"
    if column in ("updated_at", "created_at", "last_accessed_at"):  # folders first, by name; then files by column
        folders = sorted((e for e in entries if e["id"] is None), key=lambda e: e["name"].lower(), reverse=descending)
        files = sorted((e for e in entries if e["id"] is not None), key=lambda e: e[column], reverse=descending)
        entries = folders + files
    else:  # by name, case-insensitively, a folder's name read with its closing '/'
        entries.sort(key=_name_key, reverse=descending)
    return entries[offset : offset + min(limit, LIST_LIMIT)]


def _name_key(entry: dict) -> bytes:
    return (entry["name"].lower() + ("/" if entry["id"] is None else "")).encode()


def _entry(bucket: str, prefix: str, folder: Path, name: str) -> dict:
    if (folder / name).is_dir():
        return {"name": name, "id": None, "updated_at": None, "created_at": None, "metadata": None}
    meta = read_meta(bucket, f"{prefix}/{name}" if prefix else name)
    return {
        "name": name,
        "id": meta["id"],
        "updated_at": meta["updated_at"],
        "created_at": meta["created_at"],
        "last_accessed_at": meta["last_modified"],
        "metadata": {
            "size": meta["size"],
            "mimetype": meta["content_type"],
            "cacheControl": meta["cache_control"],
            "eTag": meta["etag"],
        },
    }


@router.post("/object/move")
async def move_object(request: Request):
    """移动（改名）对象；目标已存在 → 409"""
    await transfer(request, move=True)
    return {"message": "Successfully moved"}


@router.post("/object/copy")
async def copy_object(request: Request):
    """复制对象（x-upsert: true 时覆盖目标，否则已存在 → 409）"""
    bucket, key = await transfer(request, move=False)
    return {"Key": f"{bucket}/{key}"}


@router.get("/object/public/{bucket}/{key:path}")
async def download_public(bucket: str, key: str, request: Request, download: str | None = None):
    """公开桶的对象（无需密钥）；私有桶如同不存在"""
    if not (await bucket_row(bucket))["public"]:
        raise bucket_not_found()
    return file_response(request, bucket, key, download)


@router.get("/object/authenticated/{bucket}/{key:path}")
@router.get("/object/{bucket}/{key:path}")
async def download_object(bucket: str, key: str, request: Request, download: str | None = None):
    """以服务密钥下载（流式，支持 Range）"""
    require_service_key(request)
    await bucket_limit(bucket)
    return file_response(request, bucket, key, download)


@router.post("/object/{bucket}/{key:path}")
async def upload_object(bucket: str, key: str, request: Request):
    """上传对象（x-upsert: true 时覆盖，否则已存在 → 409）"""
    require_service_key(request)
    return await store_upload(request, bucket, key, upsert=upsert_header(request))


@router.put("/object/{bucket}/{key:path}")
async def update_object(bucket: str, key: str, request: Request):
    """更新（覆盖）对象"""
    require_service_key(request)
    return await store_upload(request, bucket, key, upsert=True)


@router.delete("/object/{bucket}")
async def remove_objects(bucket: str, request: Request):
    """删除多个对象；返回被删除的对象"""
    require_service_key(request)
    body = await json_body(request)
    await bucket_limit(bucket)
    prefixes = body.get("prefixes")
    if not isinstance(prefixes, list) or not all(isinstance(p, str) for p in prefixes):
        raise StorageError(400, "InvalidRequest", "prefixes must be a list of object names")
    removed = []
    for key in prefixes:
        drop_partials(bucket, key)
        try:
            meta = read_meta(bucket, key)
        except StorageError as exc:
            if exc.status == 404:
                continue
            raise
        object_file(bucket, key).unlink(missing_ok=True)
        meta_file(bucket, key).unlink(missing_ok=True)
        prune_empty(object_file(bucket, key).parent, (storage_root() / bucket).resolve())
        removed.append(meta)
    return removed


def drop_partials(bucket: str, key: str) -> None:
    """删除该对象名上未完成的可续传上传（清理被放弃的上传时，部分数据随之而去）"""
    try:
        folder = partials_dir(bucket, key)
    except StorageError:
        return
    shutil.rmtree(folder, ignore_errors=True)


def prune_empty(folder: Path, stop: Path) -> None:
    """删除对象后清理空的父目录"""
    while folder != stop and folder.is_relative_to(stop):
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent


async def transfer(request: Request, *, move: bool) -> tuple[str, str]:
    """复制或移动一个对象（连同元数据）；返回目标的桶与对象名"""
    require_service_key(request)
    body = await json_body(request)
    bucket, source, dest = body.get("bucketId"), body.get("sourceKey"), body.get("destinationKey")
    dest_bucket = body.get("destinationBucket") or bucket
    if not all(isinstance(v, str) and v for v in (bucket, source, dest, dest_bucket)):
        raise StorageError(400, "InvalidRequest", "bucketId, sourceKey and destinationKey are required")
    await bucket_limit(bucket)
    await bucket_limit(dest_bucket)
    move_or_copy(bucket, source, dest_bucket, dest, move=move, upsert=not move and upsert_header(request))
    return dest_bucket, dest


def move_or_copy(bucket: str, source: str, dest_bucket: str, dest: str, *, move: bool, upsert: bool) -> None:
    """在磁盘上复制或移动对象与其元数据（目标已存在且不覆盖 → 409）"""
    meta = read_meta(bucket, source)
    src_file, dest_file = object_file(bucket, source), object_file(dest_bucket, dest)
    if src_file == dest_file:
        return
    if dest_file.is_dir():
        raise invalid_key(dest)
    try:
        dest_file.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise invalid_key(dest) from None
    fd, name = tempfile.mkstemp(dir=dest_file.parent, prefix=TMP_PREFIX)
    os.close(fd)
    tmp = Path(name)
    try:
        shutil.copyfile(src_file, tmp)
        if upsert:
            os.replace(tmp, dest_file)
        else:
            try:
                os.link(tmp, dest_file)
            except FileExistsError:
                raise duplicate() from None
    finally:
        tmp.unlink(missing_ok=True)
    kept = {k: meta[k] for k in ("content_type", "cache_control", "etag", "metadata")}
    if move:  # the same object under a new name: its id and creation time go with it
        write_meta(dest_bucket, dest, {**kept, "id": meta["id"], "created_at": meta["created_at"]})
        src_file.unlink(missing_ok=True)
        meta_file(bucket, source).unlink(missing_ok=True)
        prune_empty(src_file.parent, (storage_root() / bucket).resolve())
    else:
        write_meta(dest_bucket, dest, {**kept, "id": str(uuid.uuid4()), "created_at": datetime.now(UTC).isoformat()})
