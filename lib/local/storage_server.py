"""Local Storage stand-in: the subset of Supabase Storage's REST API that storage3 calls, files under SPOOL_HOME.

Objects live at `SPOOL_HOME/storage/{bucket}/{key}`, their content type and cache control beside them under
`SPOOL_HOME/storage/.meta/`. Object routes need the service key (`apikey` or `Authorization: Bearer`); signed
URLs carry an HMAC-SHA256 token (key derived from the service key) bound to purpose, bucket, key and expiry.
Errors have Storage's JSON shape (`{"statusCode", "error", "message"}`), so storage3 raises StorageApiError.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.routing import APIRoute
from python_multipart.multipart import MultipartParser, parse_options_header

from lib import db
from lib.config import get_settings

SIGNED_UPLOAD_SECONDS = 2 * 60 * 60  # as Supabase: a signed upload URL is valid for two hours
MAX_SIGN_SECONDS = 10 * 365 * 24 * 3600
FIELD_LIMIT = 64 * 1024
TMP_PREFIX = ".spool-upload-"
META_DIR = ".meta"
BUCKET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


class StorageError(Exception):
    """存储接口错误（Supabase Storage 的 JSON 形状）"""

    def __init__(self, status: int, error: str, message: str):
        super().__init__(message)
        self.status, self.error, self.message = status, error, message

    def response(self) -> JSONResponse:
        """错误响应"""
        body = {"statusCode": str(self.status), "error": self.error, "message": self.message}
        return JSONResponse(body, status_code=self.status)


def _not_found(what: str = "Object") -> StorageError:
    return StorageError(404, "not_found", f"{what} not found")


def _invalid_key(key: str) -> StorageError:
    return StorageError(400, "InvalidKey", f"Invalid key: {key!r}")


def _invalid_token(message: str) -> StorageError:
    return StorageError(400, "InvalidJWT", message)


class StorageRoute(APIRoute):
    """把存储错误（与请求校验错误）写成 Storage 的错误形状，而不是产品的信封"""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def route(request: Request):
            try:
                return await handler(request)
            except StorageError as exc:
                return exc.response()
            except RequestValidationError as exc:
                return StorageError(400, "InvalidRequest", str(exc.errors()[:1])).response()

        return route


router = APIRouter(prefix="/storage/v1", tags=["Local"], route_class=StorageRoute, include_in_schema=False)


# ---------------------------------------------------------------- keys, tokens, paths


def service_key() -> str:
    """本地服务密钥"""
    key = get_settings().supabase_service_role_key
    if key:
        return key
    from lib.local.stack import local_issuer

    return local_issuer().service_role_key()


def require_service_key(request: Request) -> None:
    """对象接口只接受服务密钥（Authorization: Bearer 优先，其次 apikey）"""
    scheme, _, bearer = request.headers.get("authorization", "").partition(" ")
    presented = bearer.strip() if scheme.lower() == "bearer" else request.headers.get("apikey", "")
    if not presented:
        raise StorageError(401, "Unauthorized", "Missing service key")
    if not hmac.compare_digest(presented.encode(), service_key().encode()):
        raise StorageError(403, "Unauthorized", "invalid signature")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _signing_key() -> bytes:
    return hmac.new(service_key().encode(), b"spool-local-storage-url-v1", hashlib.sha256).digest()


def make_token(*, purpose: str, bucket: str, key: str, expires_at: int, upsert: bool = False) -> str:
    """签发一个绑定用途、桶、对象与到期时间的令牌"""
    payload = _b64(
        json.dumps({"p": purpose, "b": bucket, "k": key, "e": expires_at, "u": upsert}, separators=(",", ":")).encode()
    )
    return f"{payload}.{_b64(hmac.new(_signing_key(), payload.encode(), hashlib.sha256).digest())}"


def check_token(token: str | None, *, purpose: str, bucket: str, key: str) -> dict:
    """校验令牌（签名、用途、对象、到期）"""
    if not token:
        raise _invalid_token("Missing token")
    payload, _, signature = token.partition(".")
    expected = _b64(hmac.new(_signing_key(), payload.encode(), hashlib.sha256).digest())
    if not hmac.compare_digest(signature.encode(), expected.encode()):
        raise _invalid_token("invalid signature")
    claims = json.loads(_unb64(payload))
    if (claims.get("p"), claims.get("b"), claims.get("k")) != (purpose, bucket, key):
        raise _invalid_token("invalid signature")
    if claims.get("e", 0) < time.time():
        raise _invalid_token("jwt expired")
    return claims


def check_key(key: str) -> str:
    """拒绝不安全的对象名（.. 段、绝对路径、反斜杠、NUL 与控制字符）"""
    if not key or len(key) > 1024 or key.startswith("/") or "\\" in key or any(ord(c) < 32 for c in key):
        raise _invalid_key(key)
    if any(part in ("", ".", "..") for part in key.split("/")) or key.split("/")[-1].startswith(TMP_PREFIX):
        raise _invalid_key(key)
    return key


def check_bucket(bucket: str) -> str:
    """桶名只允许字母数字开头的简单名字"""
    if not BUCKET_NAME.fullmatch(bucket):
        raise StorageError(400, "InvalidBucketName", f"Invalid bucket name: {bucket!r}")
    return bucket


def _root() -> Path:
    return get_settings().spool_home / "storage"


def object_file(bucket: str, key: str) -> Path:
    """对象在磁盘上的位置（确认在桶目录之内）"""
    base = (_root() / check_bucket(bucket)).resolve()
    path = (base / check_key(key)).resolve()
    if not path.is_relative_to(base) or path == base:
        raise _invalid_key(key)
    return path


def _meta_file(bucket: str, key: str) -> Path:
    return _root() / META_DIR / check_bucket(bucket) / f"{check_key(key)}.json"


def read_meta(bucket: str, key: str) -> dict:
    """对象的元数据（内容类型、缓存控制、大小）"""
    path = object_file(bucket, key)
    if not path.is_file():
        raise _not_found()
    try:
        meta = json.loads(_meta_file(bucket, key).read_text())
    except (OSError, ValueError):
        meta = {}
    stat = path.stat()
    modified = datetime.fromtimestamp(stat.st_mtime, UTC).isoformat()
    return {
        "id": meta.get("id"), "name": key, "bucket_id": bucket, "version": meta.get("id"), "size": stat.st_size,
        "content_type": meta.get("content_type") or "application/octet-stream",
        "cache_control": meta.get("cache_control") or "max-age=3600", "etag": meta.get("etag"),
        "metadata": meta.get("metadata") or {}, "created_at": meta.get("created_at") or modified,
        "last_modified": modified, "updated_at": modified,
    }  # fmt: skip


_buckets: dict[str, dict] = {}


async def bucket_limit(bucket: str) -> int:
    """桶存在则返回其大小上限（桶上限或全局上限），否则 404"""
    check_bucket(bucket)
    if bucket not in _buckets:
        rows = await db.fetch_all("select id, file_size_limit from storage.buckets")
        _buckets.clear()
        _buckets.update({r["id"]: r for r in rows})
    if bucket not in _buckets:
        raise _not_found("Bucket")
    return _buckets[bucket]["file_size_limit"] or get_settings().max_upload_bytes


# ---------------------------------------------------------------- receiving an upload


class _Upload:
    """一次上传：请求体写入目标目录下的临时文件，提交时原子地换上"""

    def __init__(self, bucket: str, key: str, limit: int):
        self.bucket, self.key, self.limit = bucket, key, limit
        self.dest = object_file(bucket, key)
        if self.dest.is_dir():
            raise _invalid_key(key)
        try:
            self.dest.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise _invalid_key(key) from None
        fd, name = tempfile.mkstemp(dir=self.dest.parent, prefix=TMP_PREFIX)
        self.tmp, self.file = Path(name), os.fdopen(fd, "wb")
        self.size, self.md5, self.got_file = 0, hashlib.md5(), False
        self.content_type: str | None = None
        self.fields: dict[str, str] = {}

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            raise StorageError(413, "Payload too large", "The object exceeded the maximum allowed size")
        self.md5.update(data)
        self.file.write(data)

    def discard(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)

    def commit(self, *, upsert: bool, cache_control: str | None) -> dict:
        self.file.close()
        try:
            if upsert:
                os.replace(self.tmp, self.dest)
            else:
                try:
                    os.link(self.tmp, self.dest)  # fails if the object exists: no check-then-write race
                except FileExistsError:
                    raise StorageError(409, "Duplicate", "The resource already exists") from None
                self.tmp.unlink()
        finally:
            self.tmp.unlink(missing_ok=True)
        try:
            metadata = json.loads(self.fields.get("metadata") or "{}")
        except ValueError:
            metadata = {}
        meta = {
            "id": str(uuid.uuid4()), "content_type": self.content_type or "application/octet-stream",
            "cache_control": cache_control, "etag": f'"{self.md5.hexdigest()}"', "metadata": metadata,
            "created_at": datetime.now(UTC).isoformat(),
        }  # fmt: skip
        meta_path = _meta_file(self.bucket, self.key)
        meta_path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=meta_path.parent, prefix=TMP_PREFIX)
        with os.fdopen(fd, "w") as f:
            json.dump(meta, f)
        os.replace(name, meta_path)
        return {"Id": meta["id"], "Key": f"{self.bucket}/{self.key}"}


async def _receive(request: Request, upload: _Upload) -> None:
    """读取请求体：multipart（storage3 的方式，文件部分直接写盘）或原始字节"""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > upload.limit + FIELD_LIMIT:
        raise StorageError(413, "Payload too large", "The object exceeded the maximum allowed size")
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        upload.content_type = content_type or None
        async for chunk in request.stream():
            upload.write(chunk)
        return
    _, params = parse_options_header(content_type)
    if not params.get(b"boundary"):
        raise StorageError(400, "InvalidRequest", "Missing boundary in multipart")
    part: dict[str, Any] = {}

    def on_part_begin():
        part.update(headers={}, name=b"", value=b"", field=None, data=bytearray(), is_file=False)

    def on_header_field(data, start, end):
        part["name"] += data[start:end]

    def on_header_value(data, start, end):
        part["value"] += data[start:end]

    def on_header_end():
        part["headers"][part["name"].lower()] = part["value"]
        part["name"], part["value"] = b"", b""

    def on_headers_finished():
        _, options = parse_options_header(part["headers"].get(b"content-disposition", b""))
        part["field"] = options.get(b"name", b"").decode("utf-8", "replace")
        part["is_file"] = b"filename" in options and not upload.got_file
        if part["is_file"]:
            upload.got_file = True
            upload.content_type = part["headers"].get(b"content-type", b"").decode("latin-1") or None

    def on_part_data(data, start, end):
        if part["is_file"]:
            upload.write(data[start:end])
        elif len(part["data"]) + end - start > FIELD_LIMIT:
            raise StorageError(400, "InvalidRequest", "Form field too large")
        else:
            part["data"] += data[start:end]

    def on_part_end():
        if not part["is_file"]:
            upload.fields[part["field"]] = part["data"].decode("utf-8", "replace")

    parser = MultipartParser(params[b"boundary"], {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_headers_finished": on_headers_finished, "on_part_data": on_part_data,
        "on_part_end": on_part_end,
    })  # fmt: skip
    async for chunk in request.stream():
        parser.write(chunk)
    parser.finalize()
    if not upload.got_file:
        raise StorageError(400, "InvalidRequest", "No file in the form")


async def _store(request: Request, bucket: str, key: str, *, upsert: bool) -> dict:
    upload = _Upload(bucket, key, await bucket_limit(bucket))
    try:
        await _receive(request, upload)
        cache = upload.fields.get("cacheControl") or request.headers.get("cache-control") or "3600"
        return upload.commit(upsert=upsert, cache_control=f"max-age={cache}" if cache.isdigit() else cache)
    except BaseException:
        upload.discard()
        raise


def _upsert_header(request: Request) -> bool:
    return request.headers.get("x-upsert", "").lower() == "true"


def _file_response(bucket: str, key: str, download: str | None = None) -> FileResponse:
    meta = read_meta(bucket, key)
    kwargs = {}
    if download is not None:
        kwargs = {"filename": download or key.rsplit("/", 1)[-1], "content_disposition_type": "attachment"}
    return FileResponse(
        object_file(bucket, key),
        media_type=meta["content_type"],
        headers={"cache-control": meta["cache_control"]},
        **kwargs,
    )


def _expires_in(body: dict) -> int:
    try:
        seconds = int(body.get("expiresIn"))
    except (TypeError, ValueError):
        raise StorageError(400, "InvalidRequest", "expiresIn must be a number of seconds") from None
    if not 1 <= seconds <= MAX_SIGN_SECONDS:
        raise StorageError(400, "InvalidRequest", "expiresIn is out of range")
    return seconds


def _signed_path(bucket: str, key: str, seconds: int) -> str:
    token = make_token(purpose="download", bucket=bucket, key=key, expires_at=int(time.time()) + seconds)
    return f"/object/sign/{bucket}/{quote(key)}?token={token}"


async def _json(request: Request) -> dict:
    try:
        body = await request.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise StorageError(400, "InvalidRequest", "The body must be a JSON object")
    return body


# ---------------------------------------------------------------- routes (specific prefixes before /object/{bucket})


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
        upsert=_upsert_header(request),
        expires_at=int(time.time()) + SIGNED_UPLOAD_SECONDS,
    )
    return {"url": f"/object/upload/sign/{bucket}/{quote(key)}?token={token}", "token": token}


@router.put("/object/upload/sign/{bucket}/{key:path}")
async def upload_to_signed_url(bucket: str, key: str, request: Request, token: str | None = None):
    """凭签名令牌上传（无需密钥）"""
    claims = check_token(token, purpose="upload", bucket=bucket, key=key)
    return await _store(request, bucket, key, upsert=bool(claims.get("u")))


@router.post("/object/sign/{bucket}/{key:path}")
async def create_signed_url(bucket: str, key: str, request: Request):
    """创建签名下载 URL"""
    require_service_key(request)
    body = await _json(request)
    seconds = _expires_in(body)
    await bucket_limit(bucket)
    read_meta(bucket, key)
    return {"signedURL": _signed_path(bucket, key, seconds)}


@router.post("/object/sign/{bucket}")
async def create_signed_urls(bucket: str, request: Request):
    """批量创建签名下载 URL"""
    require_service_key(request)
    body = await _json(request)
    seconds = _expires_in(body)
    await bucket_limit(bucket)
    items = []
    for key in body.get("paths") or []:
        try:
            read_meta(bucket, str(key))
            items.append({"path": key, "signedURL": _signed_path(bucket, key, seconds), "error": None})
        except StorageError as exc:
            items.append({"path": key, "signedURL": None, "error": exc.message})
    return items


@router.get("/object/sign/{bucket}/{key:path}")
async def download_signed(bucket: str, key: str, token: str | None = None, download: str | None = None):
    """凭签名令牌下载（流式，支持 Range）"""
    check_token(token, purpose="download", bucket=bucket, key=key)
    return _file_response(bucket, key, download)


@router.get("/object/info/{bucket}/{key:path}")
async def object_info(bucket: str, key: str, request: Request):
    """对象信息"""
    require_service_key(request)
    await bucket_limit(bucket)
    return read_meta(bucket, key)


@router.post("/object/list/{bucket}")
async def list_objects(bucket: str, request: Request):
    """列出一个前缀（文件夹）下的对象"""
    require_service_key(request)
    body = await _json(request)
    await bucket_limit(bucket)
    prefix = str(body.get("prefix") or "").strip("/")
    folder = object_file(bucket, prefix) if prefix else (_root() / check_bucket(bucket))
    names = sorted(p.name for p in folder.iterdir() if not p.name.startswith(TMP_PREFIX)) if folder.is_dir() else []
    if body.get("search"):
        names = [n for n in names if str(body["search"]).lower() in n.lower()]
    if (body.get("sortBy") or {}).get("order") == "desc":
        names.reverse()
    offset, limit = int(body.get("offset") or 0), int(body.get("limit") or 100)
    items = []
    for name in names[offset : offset + limit]:
        key = f"{prefix}/{name}" if prefix else name
        if (folder / name).is_dir():
            items.append({"name": name, "id": None, "updated_at": None, "created_at": None, "metadata": None})
        else:
            meta = read_meta(bucket, key)
            items.append(
                {
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
            )
    return items


@router.get("/object/authenticated/{bucket}/{key:path}")
@router.get("/object/{bucket}/{key:path}")
async def download_object(bucket: str, key: str, request: Request, download: str | None = None):
    """以服务密钥下载（流式，支持 Range）"""
    require_service_key(request)
    await bucket_limit(bucket)
    return _file_response(bucket, key, download)


@router.post("/object/{bucket}/{key:path}")
async def upload_object(bucket: str, key: str, request: Request):
    """上传对象（x-upsert: true 时覆盖，否则已存在 → 409）"""
    require_service_key(request)
    return await _store(request, bucket, key, upsert=_upsert_header(request))


@router.put("/object/{bucket}/{key:path}")
async def update_object(bucket: str, key: str, request: Request):
    """更新（覆盖）对象"""
    require_service_key(request)
    return await _store(request, bucket, key, upsert=True)


@router.delete("/object/{bucket}")
async def remove_objects(bucket: str, request: Request):
    """删除多个对象；返回被删除的对象"""
    require_service_key(request)
    body = await _json(request)
    await bucket_limit(bucket)
    prefixes = body.get("prefixes")
    if not isinstance(prefixes, list) or not all(isinstance(p, str) for p in prefixes):
        raise StorageError(400, "InvalidRequest", "prefixes must be a list of object names")
    removed = []
    for key in prefixes:
        try:
            meta = read_meta(bucket, key)
        except StorageError as exc:
            if exc.status == 404:
                continue
            raise
        object_file(bucket, key).unlink(missing_ok=True)
        _meta_file(bucket, key).unlink(missing_ok=True)
        _prune(object_file(bucket, key).parent, (_root() / bucket).resolve())
        removed.append(meta)
    return removed


def _prune(folder: Path, stop: Path) -> None:
    """删除对象后清理空的父目录"""
    while folder != stop and folder.is_relative_to(stop):
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent
