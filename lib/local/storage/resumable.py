"""Resumable uploads (TUS 1.0.0) with a signed upload token, as Supabase Storage serves them at /upload/resumable/sign.

An upload lives in `SPOOL_HOME/storage/.tus/{bucket}/{sha256(key)}/{version}/`: `info.json` and `data`, the bytes
received so far (its size is the offset). That is outside every bucket, so nothing partial is ever listed or served;
the last byte moves `data` into place as the object. Removing an object's name (the reaper's sweep of abandoned
uploads does) removes its partial uploads too, and a partial whose token has expired goes at the next creation.
Errors are TUS's: the status and a plain-text body (Storage's message), not Storage's JSON.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import os
import shutil
import time
import uuid
from datetime import UTC, datetime
from email.utils import formatdate
from pathlib import Path

from fastapi import APIRouter, Request, Response
from starlette.requests import ClientDisconnect

from lib.config import get_settings
from lib.local.storage.objects import (
    StorageError,
    bucket_limit,
    check_token,
    duplicate,
    invalid_key,
    object_file,
    partials_dir,
    tus_root,
    write_meta,
)
from lib.local.storage.routes import StorageRoute

TUS_VERSION = "1.0.0"
EXTENSIONS = "creation,creation-with-upload,termination,expiration"
OFFSET_TYPE = "application/offset+octet-stream"
ALLOWED_HEADERS = (
    "Authorization, Content-Type, Location, Tus-Extension, Tus-Max-Size, Tus-Resumable, Tus-Version, Upload-Length, "
    "Upload-Metadata, Upload-Offset, X-Requested-With, X-Upsert, Upload-Expires, ApiKey, x-signature"
)
_busy: set[str] = set()  # uploads a PATCH is writing to (one process serves the stand-in)


def tus_error(status: int, body: str) -> StorageError:
    return StorageError(status, "TusError", body)


class TusRoute(StorageRoute):
    """把错误写成 TUS 的形状：真实状态码与纯文本正文"""

    def error_response(self, exc: StorageError) -> Response:
        return Response(exc.message, status_code=exc.status, headers=_headers(), media_type="text/plain")


router = APIRouter(prefix="/storage/v1/upload/resumable/sign", route_class=TusRoute, include_in_schema=False)


EXPOSED = (
    b"Location, Upload-Offset, Upload-Length, Upload-Expires, Tus-Resumable, Tus-Version, Tus-Extension, "
    b"Tus-Max-Size, Tus-Complete"
)


class ExposeTusHeaders:
    """浏览器里的 tus-js-client 要读 Location 与 Upload-Offset：跨域时把它们加进 Access-Control-Expose-Headers"""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith(router.prefix):
            return await self.app(scope, receive, send)

        async def expose(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if any(name == b"access-control-allow-origin" for name, _ in headers):
                    headers = [(n, v) for n, v in headers if n != b"access-control-expose-headers"]
                    headers.append((b"access-control-expose-headers", EXPOSED))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, expose)


def _headers(**extra: str) -> dict[str, str]:
    return {"Tus-Resumable": TUS_VERSION, **extra}


def _whole(value: str | None) -> int | None:
    """头里的非负整数（只认 ASCII 数字；位数再多也只算作大于任何上限）；不是则 None"""
    if value is None or not (value.isascii() and value.isdigit()):
        return None
    return int(value) if len(value.lstrip("0")) <= 19 else 2**63


def _require_tus(request: Request) -> None:
    if request.headers.get("tus-resumable") != TUS_VERSION:
        raise StorageError(412, "TusError", "Unsupported version")


def _authorise(request: Request, bucket: str, key: str) -> dict:
    """签名上传令牌在 x-signature 里（不用用户的 Authorization）"""
    signature = request.headers.get("x-signature")
    if not signature:
        raise StorageError(400, "InvalidSignature", "Missing x-signature header")
    return check_token(signature, purpose="upload", bucket=bucket, key=key)


def _metadata(header: str | None) -> dict[str, str]:
    """解析 Upload-Metadata：逗号分隔的 "键 base64值"（值可省略）"""
    invalid = tus_error(400, "Upload-Metadata is invalid")
    pairs: dict[str, str] = {}
    for item in (header or "").split(","):
        key, _, value = item.strip().partition(" ")
        if not key or key in pairs or " " in value:
            raise invalid
        try:
            pairs[key] = base64.b64decode(value, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise invalid from None
    return pairs


def _upload_id(bucket: str, key: str, version: str) -> str:
    return base64.urlsafe_b64encode(f"{bucket}/{key}/{version}".encode()).decode().rstrip("=")


def _upload_dir(upload_id: str) -> Path:
    """上传 ID（base64url 的 桶/对象名/版本）对应的目录；不认识的 ID → 404"""
    try:
        name = base64.urlsafe_b64decode(upload_id + "=" * (-len(upload_id) % 4)).decode()
        rest, version = name.rsplit("/", 1)
        bucket, key = rest.split("/", 1)
        path = partials_dir(bucket, key) / str(uuid.UUID(version))
    except (ValueError, StorageError):
        path = None
    if path is None or not (path / "info.json").is_file():
        raise tus_error(404, "The file for this url was not found")
    return path


def _read_info(folder: Path) -> dict:
    try:
        return json.loads((folder / "info.json").read_text())
    except (OSError, ValueError):
        raise tus_error(404, "The file for this url was not found") from None


def _save_info(folder: Path, info: dict) -> None:
    tmp = folder / "info.json.tmp"
    tmp.write_text(json.dumps(info))
    os.replace(tmp, folder / "info.json")


def _offset(folder: Path, info: dict) -> int:
    return info["length"] if info.get("done") else (folder / "data").stat().st_size


def _expires(info: dict) -> dict[str, str]:
    return {} if info.get("done") else {"Upload-Expires": formatdate(info["expires_at"], usegmt=True)}


def _cache_control(value: str | None) -> str:
    # As Storage: a number of seconds becomes max-age, anything else no-cache.
    return f"max-age={value}" if value and value.isascii() and value.lstrip("-").isdigit() else "no-cache"


def _sweep_expired() -> None:
    """删除令牌已过期、无法再续传的部分上传（正在写入的除外）"""
    now = time.time()
    for info_file in tus_root().glob("*/*/*/info.json"):
        try:
            info = json.loads(info_file.read_text())
        except (OSError, ValueError):
            continue
        folder = info_file.parent
        if not info.get("done") and info.get("expires_at", 0) < now and info.get("id") not in _busy:
            shutil.rmtree(folder, ignore_errors=True)


@router.options("")
@router.options("/{upload_id}")
async def options() -> Response:
    """TUS 能力：版本、扩展、最大尺寸"""
    return Response(
        status_code=204,
        headers=_headers(**{
            "Tus-Version": TUS_VERSION, "Tus-Extension": EXTENSIONS,
            "Tus-Max-Size": str(get_settings().max_upload_bytes),
            "Access-Control-Allow-Methods": "POST, HEAD, PATCH, OPTIONS, DELETE",
            "Access-Control-Allow-Headers": ALLOWED_HEADERS, "Access-Control-Max-Age": "86400",
        }),
    )  # fmt: skip


@router.post("")
async def create(request: Request) -> Response:
    """创建上传：Upload-Length 与 Upload-Metadata（bucketName、objectName、contentType、cacheControl）"""
    _require_tus(request)
    if "upload-defer-length" in request.headers:
        raise tus_error(501, "creation-defer-length extension is not (yet) supported.")
    length = _whole(request.headers.get("upload-length"))
    if length is None:
        raise tus_error(400, "Upload-Length or Upload-Defer-Length header required")
    meta = _metadata(request.headers.get("upload-metadata"))
    bucket, key = meta.get("bucketName", ""), meta.get("objectName", "")
    content_type = meta.get("contentType", "")
    if not (content_type.isascii() and content_type.isprintable()):  # it is sent back as a header with the object
        raise tus_error(400, "Upload-Metadata is invalid")
    claims = _authorise(request, bucket, key)
    if length > await bucket_limit(bucket):
        raise tus_error(413, "Maximum size exceeded")
    if object_file(bucket, key).exists() and not claims.get("u"):
        raise duplicate()  # a token without upsert was used already
    _sweep_expired()
    folder, upload_id = _new_upload(bucket, key, length, meta, claims)
    headers = _headers(Location=f"{str(request.url.replace(query=None)).rstrip('/')}/{upload_id}")
    if request.headers.get("content-type") == OFFSET_TYPE:  # creation-with-upload: the first bytes come along
        headers["Upload-Offset"] = str(await _write(request, folder, _read_info(folder), 0))
    elif length == 0:  # nothing to wait for (tus-js-client sends no PATCH for an empty file)
        await _finish(folder, _read_info(folder))
    headers.update(_expires(_read_info(folder)))
    return Response(status_code=201, headers=headers)


def _new_upload(bucket: str, key: str, length: int, meta: dict, claims: dict) -> tuple[Path, str]:
    version = str(uuid.uuid4())
    upload_id = _upload_id(bucket, key, version)
    folder = partials_dir(bucket, key) / version
    folder.mkdir(parents=True)
    (folder / "data").touch()
    _save_info(folder, {
        "id": upload_id, "bucket": bucket, "key": key, "length": length, "upsert": bool(claims.get("u")),
        "expires_at": claims["e"], "content_type": meta.get("contentType") or "application/octet-stream",
        "cache_control": _cache_control(meta.get("cacheControl")), "metadata": meta.get("metadata"),
        "created_at": datetime.now(UTC).isoformat(),
    })  # fmt: skip
    return folder, upload_id


@router.api_route("/{upload_id}", methods=["GET", "HEAD"])  # the app answers HEAD as GET without a body
async def offset(upload_id: str, request: Request) -> Response:
    """上传的当前偏移与长度"""
    _require_tus(request)
    folder = _upload_dir(upload_id)
    info = _read_info(folder)
    _authorise(request, info["bucket"], info["key"])
    headers = {"Upload-Offset": str(_offset(folder, info)), "Upload-Length": str(info["length"])}
    return Response(status_code=200, headers=_headers(**headers, **{"Cache-Control": "no-store"}))


@router.patch("/{upload_id}")
async def append(upload_id: str, request: Request) -> Response:
    """在 Upload-Offset 处追加字节；偏移不符 → 409；最后一个字节到达时对象才出现"""
    _require_tus(request)
    if request.headers.get("content-type") != OFFSET_TYPE:
        raise tus_error(415, f"Content-Type must be {OFFSET_TYPE}")
    claimed = request.headers.get("upload-offset")
    if claimed is None:
        raise tus_error(403, "Upload-Offset header required")
    if _whole(claimed) is None:
        raise tus_error(400, "Invalid Upload-Offset")
    folder = _upload_dir(upload_id)
    info = _read_info(folder)
    _authorise(request, info["bucket"], info["key"])
    new_offset = await _write(request, folder, info, int(claimed))
    info = _read_info(folder)
    headers = _headers(**{"Upload-Offset": str(new_offset)}, **_expires(info))
    if info.get("done"):
        headers["Tus-Complete"] = "1"
    return Response(status_code=204, headers=headers)


@router.delete("/{upload_id}")
async def terminate(upload_id: str, request: Request) -> Response:
    """放弃一个未完成的上传：删除已收到的字节"""
    _require_tus(request)
    folder = _upload_dir(upload_id)
    info = _read_info(folder)
    _authorise(request, info["bucket"], info["key"])
    if info.get("done"):
        raise tus_error(400, "Cannot terminate an already completed upload")
    if upload_id in _busy:
        raise tus_error(409, "Upload-Offset conflict")
    shutil.rmtree(folder, ignore_errors=True)
    return Response(status_code=204, headers=_headers())


async def _write(request: Request, folder: Path, info: dict, claimed: int) -> int:
    """在锁内核对偏移、流式写盘、必要时完成；返回新的偏移"""
    upload_id = info["id"]
    if info.get("done"):  # a finished upload: a repeated last PATCH is answered, nothing is written again
        if claimed != info["length"]:
            raise tus_error(409, "Upload-Offset conflict")
        return claimed
    if upload_id in _busy:  # another request is writing: its offset is moving
        raise tus_error(409, "Upload-Offset conflict")
    _busy.add(upload_id)
    try:
        if claimed != _offset(folder, info):
            raise tus_error(409, "Upload-Offset conflict")
        if info["length"] > await bucket_limit(info["bucket"]):
            raise tus_error(413, "Maximum size exceeded")
        try:
            new_offset = await _receive(request, folder / "data", claimed, info["length"])
            if new_offset == info["length"]:
                await _finish(folder, info)
        except FileNotFoundError:  # its object name was removed meanwhile, and its partial upload with it
            raise tus_error(404, "The file for this url was not found") from None
        return new_offset
    finally:
        _busy.discard(upload_id)


async def _receive(request: Request, data: Path, offset: int, length: int) -> int:
    """把请求体追加到 data（不超过 Upload-Length）；客户端断开时保留已收到的字节"""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and offset + int(declared) > length:
        raise tus_error(413, "upload's size exceeded")
    with data.open("ab") as f:
        try:
            async for chunk in request.stream():
                if offset + len(chunk) > length:
                    raise tus_error(413, "upload's size exceeded")
                f.write(chunk)
                offset += len(chunk)
        except ClientDisconnect:
            pass  # what arrived stays: the client resumes from the offset HEAD gives
    return offset


async def _finish(folder: Path, info: dict) -> None:
    """全部字节到达：把 data 换成对象（不可覆盖的令牌：对象已存在 → 409），写入元数据"""
    bucket, key, data = info["bucket"], info["key"], folder / "data"
    dest = object_file(bucket, key)
    if dest.is_dir():
        raise invalid_key(key)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise invalid_key(key) from None
    etag = await asyncio.to_thread(_md5, data)
    if info["upsert"]:
        os.replace(data, dest)
    else:
        try:
            os.link(data, dest)  # fails if the object exists: no check-then-write race
        except FileExistsError:
            shutil.rmtree(folder, ignore_errors=True)
            raise duplicate() from None
        data.unlink(missing_ok=True)
    try:
        user_metadata = json.loads(info.get("metadata") or "{}")
    except ValueError:
        user_metadata = {}
    write_meta(bucket, key, {
        "id": str(uuid.uuid4()), "content_type": info["content_type"], "cache_control": info["cache_control"],
        "etag": f'"{etag}"', "metadata": user_metadata, "created_at": datetime.now(UTC).isoformat(),
    })  # fmt: skip
    try:
        _save_info(folder, {**info, "done": True})
        others = list(partials_dir(bucket, key).iterdir()) if not info["upsert"] else []
    except FileNotFoundError:  # the partial uploads were removed meanwhile: the object stands
        return
    for other in others:  # without upsert, the others for this name can only end in a 409 now
        if other != folder and _upload_id(bucket, key, other.name) not in _busy:
            shutil.rmtree(other, ignore_errors=True)


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as f:
        while block := f.read(1024 * 1024):
            digest.update(block)
    return digest.hexdigest()
