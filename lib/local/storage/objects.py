"""Objects on disk and who may touch them: the service key, signed tokens, safe paths, Storage errors."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from fastapi import Request
from fastapi.responses import JSONResponse

from lib import db
from lib.config import get_settings

SIGNED_UPLOAD_SECONDS = 2 * 60 * 60  # as Supabase: a signed upload URL is valid for two hours
MAX_SIGN_SECONDS = 10 * 365 * 24 * 3600
FIELD_LIMIT = 64 * 1024
TMP_PREFIX = ".spool-upload-"
META_DIR = ".meta"
TUS_DIR = ".tus"
BUCKET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
# What Storage refuses in an object key: control characters, S3's "characters to avoid", invisible ones.
KEY_REFUSED = re.compile(
    r"[\x00-\x1f\x7f-\x9f#\[\]{}^`\"<>\\|%~\u034f\u061c\u200b\u200e\u200f\u2028\u2029\u202a-\u202e\u2060\u2066-\u2069\ufeff]"
)


class StorageError(Exception):
    """存储接口错误（Supabase Storage 的 JSON 形状）"""

    def __init__(self, status: int, error: str, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.error, self.message = status, error, message
        # Storage's ErrorCode: storage-js reads it into StorageApiError.code; `error` is the older name storage3 reads.
        self.code = code or error

    def response(self) -> JSONResponse:
        """错误响应：与 Supabase Storage 相同，真正的状态码在响应体里，HTTP 状态是 400（5xx 除外）"""
        body = {"statusCode": str(self.status), "code": self.code, "error": self.error, "message": self.message}
        # Supabase's API gateway answers a request without a key with a plain 401; Storage itself, 400.
        return JSONResponse(body, status_code=self.status if self.status >= 500 or self.status == 401 else 400)


def not_found() -> StorageError:
    return StorageError(404, "not_found", "Object not found", "NoSuchKey")


def bucket_not_found() -> StorageError:
    # Storage names this error apart from a missing object's "not_found" (storage3's exists() goes by it).
    return StorageError(404, "Bucket not found", "Bucket not found", "NoSuchBucket")


def duplicate() -> StorageError:
    return StorageError(409, "Duplicate", "The resource already exists", "ResourceAlreadyExists")


def too_large() -> StorageError:
    return StorageError(413, "Payload too large", "The object exceeded the maximum allowed size", "EntityTooLarge")


def invalid_key(key: str) -> StorageError:
    return StorageError(400, "InvalidKey", f"Invalid key: {key}")


def invalid_token(message: str) -> StorageError:
    return StorageError(400, "InvalidJWT", message)


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
        raise StorageError(403, "Unauthorized", "invalid signature", "AccessDenied")


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
        raise invalid_token("Missing token")
    payload, _, signature = token.partition(".")
    expected = _b64(hmac.new(_signing_key(), payload.encode(), hashlib.sha256).digest())
    if not hmac.compare_digest(signature.encode(), expected.encode()):
        raise invalid_token("invalid signature")
    claims = json.loads(_unb64(payload))
    if (claims.get("p"), claims.get("b"), claims.get("k")) != (purpose, bucket, key):
        raise invalid_token("invalid signature")
    if claims.get("e", 0) < time.time():
        raise invalid_token("jwt expired")
    return claims


def check_key(key: str) -> str:
    """拒绝 Storage 不收或不安全的对象名（.. 段、绝对路径、Storage 拒收的字符、文件系统放不下的长段）"""
    if not key or len(key.encode(errors="replace")) > 1024 or key.startswith("/") or KEY_REFUSED.search(key):
        raise invalid_key(key)
    parts = key.split("/")
    if any(part in ("", ".", "..") or len(part.encode(errors="replace")) > 255 for part in parts):
        raise invalid_key(key)
    if parts[-1].startswith(TMP_PREFIX):
        raise invalid_key(key)
    return key


def check_bucket(bucket: str) -> str:
    """桶名只允许字母数字开头的简单名字"""
    if not BUCKET_NAME.fullmatch(bucket):
        raise StorageError(400, "InvalidBucketName", f"Invalid bucket name: {bucket!r}")
    return bucket


def storage_root() -> Path:
    return get_settings().spool_home / "storage"


def object_file(bucket: str, key: str) -> Path:
    """对象在磁盘上的位置（确认在桶目录之内）"""
    base = (storage_root() / check_bucket(bucket)).resolve()
    path = (base / check_key(key)).resolve()
    if not path.is_relative_to(base) or path == base:
        raise invalid_key(key)
    return path


def tus_root() -> Path:
    """可续传上传的部分数据：在任何桶之外（"." 开头不是合法桶名）"""
    return storage_root() / TUS_DIR


def partials_dir(bucket: str, key: str) -> Path:
    """一个对象名的各个未完成的可续传上传（按对象名的哈希）"""
    digest = hashlib.sha256(check_key(key).encode(errors="surrogatepass")).hexdigest()
    return tus_root() / check_bucket(bucket) / digest


def meta_file(bucket: str, key: str) -> Path:
    """对象元数据的位置：按对象名的哈希，任何对象名（如 "c" 与 "c.json/x"）都不会互相占位"""
    digest = hashlib.sha256(check_key(key).encode(errors="surrogatepass")).hexdigest()
    return storage_root() / META_DIR / check_bucket(bucket) / digest[:2] / f"{digest}.json"


def write_meta(bucket: str, key: str, meta: dict) -> None:
    """原子地写入对象的元数据"""
    path = meta_file(bucket, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=TMP_PREFIX)
    with os.fdopen(fd, "w") as f:
        json.dump(meta, f)
    os.replace(name, path)


def _legacy_meta_file(bucket: str, key: str) -> Path:
    return storage_root() / META_DIR / check_bucket(bucket) / f"{key}.json"  # before the hashed layout


def read_meta(bucket: str, key: str) -> dict:
    """对象的元数据（内容类型、缓存控制、大小）"""
    path = object_file(bucket, key)
    if not path.is_file():
        raise not_found()
    meta = {}
    for candidate in (meta_file(bucket, key), _legacy_meta_file(bucket, key)):
        try:
            meta = json.loads(candidate.read_text())
            break
        except (OSError, ValueError):
            continue
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


async def bucket_row(bucket: str) -> dict:
    """桶的设置（是否公开、大小上限）；桶不存在 → 404"""
    check_bucket(bucket)
    if bucket not in _buckets:
        rows = await db.fetch_all("select id, public, file_size_limit from storage.buckets")
        _buckets.clear()
        _buckets.update({r["id"]: r for r in rows})
    if bucket not in _buckets:
        raise bucket_not_found()
    return _buckets[bucket]


async def bucket_limit(bucket: str) -> int:
    """桶存在则返回其大小上限（桶上限或全局上限），否则 404"""
    return (await bucket_row(bucket))["file_size_limit"] or get_settings().max_upload_bytes
