"""Storage: the media bucket through supabase-py's storage client (storage3), the same code in both modes.

Every object lives under its owner's folder (`{user_id}/...`). Methods take the path and, from request-handling
code, the `user_id` it must belong to; server-side code (the job runner) may leave `user_id` out, and the path
must still be a well-formed user path.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Collection
from contextlib import asynccontextmanager
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO
from urllib.parse import urlsplit, urlunsplit

from lib.config import get_settings
from lib.errors import Conflict, Forbidden, NotFound, PayloadTooLarge, UpstreamError

if TYPE_CHECKING:  # imported on first use: the web container's cold start does not pay for them
    import httpx
    from storage3 import AsyncStorageClient

log = logging.getLogger("spool.storage")

SIGNED_UPLOAD_SECONDS = 2 * 60 * 60  # Supabase Storage: a signed upload URL is valid for two hours
INTERNAL_URL_SECONDS = 10 * 60
HEAD_BYTES = 64 * 1024
CHUNK_BYTES = 1024 * 1024
LIST_PAGE = 1000
SIGNED_URL_CACHE_SIZE = 10_000  # download URLs one process remembers (a few MB)


class StorageError(UpstreamError):
    """存储服务出错（status 为存储返回的 HTTP 状态，5xx/429 可重试）"""

    def __init__(self, message: str, *, status: int):
        super().__init__(message)
        self.status = status


def user_path(user_id: str, *parts: str) -> str:
    """生成用户名下的存储路径（{user_id}/...）"""
    return check_path("/".join([str(uuid.UUID(str(user_id))), *parts]))


def check_path(path: str, user_id: str | None = None) -> str:
    """检查存储路径：形如 {user_id}/...、无 .. 段；给定 user_id 时必须属于该用户"""
    parts = path.split("/") if isinstance(path, str) else []
    if len(parts) < 2 or any(p in ("", ".", "..") or "\\" in p or "\x00" in p for p in parts):
        raise Forbidden("The storage path is not valid.")
    try:
        owner = str(uuid.UUID(parts[0]))
    except ValueError:
        raise Forbidden("The storage path is not under a user.") from None
    if owner != parts[0] or (user_id is not None and owner != str(uuid.UUID(str(user_id)))):
        raise Forbidden("The storage path belongs to another user.")
    return path


class StorageService:
    """存储服务（storage3 客户端，服务密钥）"""

    def __init__(self) -> None:
        self._client: AsyncStorageClient | None = None
        self._http: httpx.AsyncClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Download URLs signed by the batch call, by (bucket, path, promised lifetime): (URL, until when it may be
        # handed out again, on the monotonic clock). Bounded LRU; a removed path is forgotten.
        self._signed: OrderedDict[tuple[str, str, int], tuple[str, float]] = OrderedDict()
        self._signed_lock = threading.Lock()
        self._removals = 0  # bumped by every remove: a signing that overlapped one keeps nothing

    # ------------------------------------------------------------ client

    def _ensure_client(self) -> None:
        loop = asyncio.get_running_loop()
        if self._client is not None and self._loop is loop:
            return
        settings = get_settings()
        if not settings.supabase_url or not settings.supabase_service_role_key:
            raise RuntimeError("SUPABASE_URL and SUPABASE_SERVICE_ROLE_KEY are needed for storage")
        import httpx
        from storage3 import AsyncStorageClient

        key = settings.supabase_service_role_key
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(120, connect=10), follow_redirects=True)
        self._client = AsyncStorageClient(
            self.storage_url, {"apikey": key, "Authorization": f"Bearer {key}"}, http_client=self._http
        )
        self._loop = loop

    @property
    def storage_url(self) -> str:
        """存储 API 的内部地址（以 / 结尾）"""
        return f"{get_settings().supabase_url.rstrip('/')}/storage/v1/"

    def _bucket(self):
        self._ensure_client()
        return self._client.from_(get_settings().storage_bucket)

    def public_url(self, url: str) -> str:
        """把内部存储地址换成浏览器可达的地址（本地模式下优先 PUBLIC_URL）"""
        settings = get_settings()
        if settings.is_local and settings.public_url and url.startswith(self.storage_url):
            return f"{settings.public_url.rstrip('/')}/storage/v1/{url[len(self.storage_url) :]}"
        return url

    async def close(self) -> None:
        """关闭 HTTP 客户端"""
        if self._http is not None and self._loop is asyncio.get_running_loop():
            await self._http.aclose()
        self._client = self._http = self._loop = None

    @asynccontextmanager
    async def _errors(self, what: str) -> AsyncIterator[None]:
        import httpx
        from storage3.exceptions import StorageApiError

        try:
            yield
        except StorageApiError as exc:
            status = int(exc.status) if str(exc.status).isdigit() else 502
            if status == 404 or exc.code == "not_found":
                raise NotFound("File not found.") from None
            if status == 409:
                raise Conflict("The file already exists.") from None
            if status == 413:
                raise PayloadTooLarge("The file is larger than storage accepts.") from None
            log.warning("storage refused to %s: %s %s %s", what, exc.status, exc.code, exc.message)
            raise StorageError(f"Storage could not {what}.", status=status) from exc
        except httpx.HTTPStatusError as exc:
            status = _storage_status(exc.response)
            if status == 404:
                raise NotFound("File not found.") from None
            log.warning("storage refused to %s: HTTP %s", what, status)
            raise StorageError(f"Storage could not {what}.", status=status) from exc
        except httpx.TransportError as exc:
            log.warning("storage unreachable while trying to %s: %r", what, exc)
            raise StorageError(f"Storage could not {what}.", status=503) from exc

    # ------------------------------------------------------------ writes

    async def upload_file(
        self, *, path: str, local_file: str | Path, content_type: str, user_id: str | None = None, upsert: bool = True
    ) -> str:
        """从磁盘流式上传文件"""
        check_path(path, user_id)
        options = {"content-type": content_type, "cache-control": "3600", "upsert": "true" if upsert else "false"}
        async with self._errors("upload the file"):
            await self._bucket().upload(path, Path(local_file), options)
        return path

    async def upload_open_file(
        self, *, path: str, file: BinaryIO, content_type: str, user_id: str | None = None, upsert: bool = True
    ) -> str:
        """从打开的文件（如表单上传的临时文件）从头流式上传，不把整个文件读进内存"""
        check_path(path, user_id)
        options = {"content-type": content_type, "cache-control": "3600", "upsert": "true" if upsert else "false"}
        # storage3 streams a FileIO; a spooled upload already on disk hands over its descriptor (a copy of it).
        stream = io.FileIO(os.dup(file.fileno()), "rb")
        try:
            stream.seek(0)
            async with self._errors("upload the file"):
                await self._bucket().upload(path, stream, options)
        finally:
            stream.close()
        return path

    async def upload_bytes(
        self, *, path: str, data: bytes, content_type: str, user_id: str | None = None, upsert: bool = True
    ) -> str:
        """上传内存中的字节"""
        check_path(path, user_id)
        options = {"content-type": content_type, "cache-control": "3600", "upsert": "true" if upsert else "false"}
        async with self._errors("upload the file"):
            await self._bucket().upload(path, data, options)
        return path

    async def create_signed_upload_url(self, *, path: str, user_id: str | None = None) -> dict:
        """创建签名上传 URL（浏览器直传，约两小时有效，不可覆盖）"""
        check_path(path, user_id)
        async with self._errors("sign an upload"):
            signed = await self._bucket().create_signed_upload_url(path)
        return {
            "url": self.public_url(signed["signed_url"]),
            "token": signed["token"],
            "bucket": get_settings().storage_bucket,
            "path": path,
            "resumable_url": self.resumable_url(),
            "expires_at": int(time.time()) + SIGNED_UPLOAD_SECONDS,
        }

    def resumable_url(self) -> str:
        """可续传（TUS）签名上传的端点；云端用 Storage 的直连主机名（Supabase 建议大文件走它）"""
        url = self.public_url(f"{self.storage_url}upload/resumable/sign")
        parts = urlsplit(url)
        host = parts.hostname or ""
        if host.endswith(".supabase.co") and not host.endswith(".storage.supabase.co"):
            url = urlunsplit(parts._replace(netloc=host.removesuffix(".supabase.co") + ".storage.supabase.co"))
        return url

    async def remove(self, *, paths: list[str], user_id: str | None = None) -> list[str]:
        """删除对象；返回确实被删除的路径"""
        for path in paths:
            check_path(path, user_id)
        if not paths:
            return []
        self._forget_signed(paths)
        try:
            async with self._errors("remove files"):
                removed = await self._bucket().remove(list(paths))
        finally:
            self._forget_signed(paths)  # and what a signing that overlapped the removal may have kept
        return [item.get("name") for item in removed if isinstance(item, dict)]

    # ------------------------------------------------------------ reads

    async def create_signed_url(
        self,
        *,
        path: str,
        expires_in: int | None = None,
        user_id: str | None = None,
        download: str | bool | None = None,
    ) -> str:
        """创建签名下载 URL（绝对地址，浏览器可用）"""
        return self.public_url(
            await self._signed_url(path, expires_in or get_settings().signed_url_seconds, user_id, download)
        )

    async def create_signed_urls(
        self, *, paths: list[str], expires_in: int | None = None, fresh: Collection[str] = ()
    ) -> dict[str, str | None]:
        """批量签名下载 URL（至多一次请求；每个至少还有 expires_in 秒有效，记得的够新就直接交出）；不存在 → None"""
        for path in paths:
            check_path(path)
        if not paths:
            return {}
        lifetime = expires_in or get_settings().signed_url_seconds
        bucket = get_settings().storage_bucket
        # Signed for half as long again as promised, and handed out again during that extra half: every URL
        # handed out still has at least `lifetime` left.
        reuse = lifetime // 2
        urls = {} if not reuse else self._remembered(bucket, [p for p in paths if p not in fresh], lifetime)
        missing = sorted({p for p in paths if p not in urls})
        if missing:
            removals, started = self._removals, time.monotonic()
            async with self._errors("sign downloads"):
                signed = await self._bucket().create_signed_urls(missing, lifetime + reuse)
            fetched = {item["path"]: item["signedURL"] for item in signed if item["path"] in missing}
            urls.update(fetched)
            if reuse:
                self._remember(bucket, fetched, lifetime, started + reuse, removals)
        return {path: (url := urls.get(path)) and self.public_url(url) for path in paths}

    def _remembered(self, bucket: str, paths: list[str], lifetime: int) -> dict[str, str]:
        """记得的、仍可再交出的签名 URL（原始地址）"""
        now, found = time.monotonic(), {}
        with self._signed_lock:
            for path in paths:
                key = (bucket, path, lifetime)
                entry = self._signed.get(key)
                if entry is None:
                    continue
                if entry[1] <= now:
                    del self._signed[key]
                    continue
                self._signed.move_to_end(key)
                found[path] = entry[0]
        return found

    def _remember(self, bucket: str, urls: dict[str, str | None], lifetime: int, until: float, removals: int) -> None:
        with self._signed_lock:
            if removals != self._removals:  # a removal overlapped the signing: keep nothing (checked under the lock)
                return
            for path, url in urls.items():
                if url:  # a missing file is asked about again: it may be uploaded later
                    self._signed[(bucket, path, lifetime)] = (url, until)
                    self._signed.move_to_end((bucket, path, lifetime))
            while len(self._signed) > SIGNED_URL_CACHE_SIZE:
                self._signed.popitem(last=False)

    def _forget_signed(self, paths: list[str]) -> None:
        """忘掉这些路径记得的签名 URL（删除之前与之后都不再交出）"""
        doomed = set(paths)
        with self._signed_lock:
            self._removals += 1
            if self._signed:
                for key in [key for key in self._signed if key[1] in doomed]:
                    del self._signed[key]

    async def _signed_url(
        self, path: str, expires_in: int, user_id: str | None, download: str | bool | None = None
    ) -> str:
        check_path(path, user_id)
        options = {"download": download} if download else None
        async with self._errors("sign a download"):
            signed = await self._bucket().create_signed_url(path, expires_in, options)
        return signed["signedURL"]

    async def info(self, *, path: str, user_id: str | None = None) -> dict | None:
        """对象信息（大小、内容类型）；不存在 → None"""
        check_path(path, user_id)
        try:
            async with self._errors("read file info"):
                data = await self._bucket().info(path)
        except NotFound:
            return None
        size = data.get("size")
        if size is None:
            size = (data.get("metadata") or {}).get("size")
        content_type = data.get("content_type") or (data.get("metadata") or {}).get("mimetype")
        return {"path": path, "size": size, "content_type": content_type, "etag": data.get("etag")}

    async def list_files(self, *, prefix: str, user_id: str | None = None) -> list[str]:
        """列出一个文件夹下（含子文件夹）全部对象的路径"""
        return [path async for files in self.walk(prefix=prefix, user_id=user_id) for path in files]

    async def walk(self, *, prefix: str, user_id: str | None = None) -> AsyncIterator[list[str]]:
        """逐个文件夹交出其中对象的路径（含子文件夹，深度优先），调用方可以边列边处理"""
        check_path(prefix.strip("/"), user_id)
        folders = [prefix.strip("/")]
        while folders:
            folder, files, offset = folders.pop(), [], 0
            while True:
                async with self._errors("list files"):
                    items = await self._bucket().list(folder, {"limit": LIST_PAGE, "offset": offset})
                for item in items:
                    # Supabase lists a subfolder as an entry without an id.
                    (files if item.get("id") else folders).append(f"{folder}/{item['name']}")
                if len(items) < LIST_PAGE:
                    break
                offset += LIST_PAGE
            if files:
                yield files

    async def exists(self, *, path: str, user_id: str | None = None) -> bool:
        """对象是否存在"""
        return await self.info(path=path, user_id=user_id) is not None

    async def read_head(self, *, path: str, size: int = HEAD_BYTES, user_id: str | None = None) -> bytes:
        """流式读取对象的前若干字节（Range 请求，不下载整个文件）"""
        url = await self._signed_url(path, INTERNAL_URL_SECONDS, user_id)
        head = bytearray()
        async with (
            self._errors("read the file"),
            self._http.stream("GET", url, headers={"Range": f"bytes=0-{size - 1}"}) as resp,
        ):
            await _raise_for_status(resp)
            async for chunk in resp.aiter_bytes():
                head += chunk
                if len(head) >= size:
                    break
        return bytes(head[:size])

    async def download_to(self, *, path: str, dest: str | Path, user_id: str | None = None) -> int:
        """流式下载到本地文件（先写 .part 再改名）；返回字节数"""
        url = await self._signed_url(path, INTERNAL_URL_SECONDS, user_id)
        dest = Path(dest)
        part = dest.with_name(dest.name + ".part")
        written = 0
        f = await asyncio.to_thread(part.open, "wb")
        try:
            async with self._errors("download the file"), self._http.stream("GET", url) as resp:
                await _raise_for_status(resp)
                async for chunk in resp.aiter_bytes(CHUNK_BYTES):
                    await asyncio.to_thread(f.write, chunk)
                    written += len(chunk)
            await asyncio.to_thread(f.close)
            await asyncio.to_thread(part.replace, dest)
        except BaseException:
            f.close()
            part.unlink(missing_ok=True)
            raise
        return written


async def _raise_for_status(resp) -> None:
    """错误响应先读完响应体（其中的 statusCode 才是真正的状态），再抛出"""
    if resp.is_error:
        await resp.aread()
        resp.raise_for_status()


def _storage_status(resp) -> int:
    """Supabase Storage 的错误以 HTTP 400 返回，真正的状态码在响应体的 statusCode 里（storage3 也这样读）"""
    try:
        code = str(resp.json().get("statusCode"))
    except (ValueError, AttributeError):
        return resp.status_code
    return int(code) if code.isdigit() else resp.status_code


async def with_signed_urls(
    items: list[dict], field: str, path_of: Callable[[dict], str | None], reusable: Callable[[dict], bool] | None = None
) -> list[dict]:
    """给每一项的 field 换上签名的下载地址（至多一次存储请求；reusable 为假的项重新签名）；没有路径或文件不在 → None"""
    paths = {index: path for index, item in enumerate(items) if (path := path_of(item))}
    fresh = {paths[i] for i in paths if reusable is not None and not reusable(items[i])}
    urls = await get_storage().create_signed_urls(paths=sorted(set(paths.values())), fresh=fresh) if paths else {}
    return [{**item, field: urls.get(paths[index]) if index in paths else None} for index, item in enumerate(items)]


@cache
def get_storage() -> StorageService:
    """获取存储服务单例"""
    return StorageService()
