"""Receiving an upload: a streamed body (raw or multipart) into a temp file, size-limited, then swapped in."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import FileResponse, Response
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.responses import MalformedRangeHeader, RangeNotSatisfiable

from lib.local.storage.objects import (
    FIELD_LIMIT,
    MAX_SIGN_SECONDS,
    TMP_PREFIX,
    StorageError,
    bucket_limit,
    duplicate,
    invalid_key,
    make_token,
    object_file,
    read_meta,
    too_large,
    write_meta,
)


class _Upload:
    """一次上传：请求体写入目标目录下的临时文件，提交时原子地换上"""

    def __init__(self, bucket: str, key: str, limit: int):
        self.bucket, self.key, self.limit = bucket, key, limit
        self.dest = object_file(bucket, key)
        if self.dest.is_dir():
            raise invalid_key(key)
        try:
            self.dest.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise invalid_key(key) from None
        fd, name = tempfile.mkstemp(dir=self.dest.parent, prefix=TMP_PREFIX)
        self.tmp, self.file = Path(name), os.fdopen(fd, "wb")
        self.size, self.md5, self.got_file = 0, hashlib.md5(), False
        self.content_type: str | None = None
        self.fields: dict[str, str] = {}

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            raise too_large()
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
                    raise duplicate() from None
                self.tmp.unlink()
        finally:
            self.tmp.unlink(missing_ok=True)
        try:
            metadata = json.loads(self.fields.get("metadata") or "{}")
        except ValueError:  # as Storage: metadata that does not parse is dropped, the upload kept
            metadata = {}
        meta = {
            "id": str(uuid.uuid4()), "content_type": self.content_type or "application/octet-stream",
            "cache_control": cache_control, "etag": f'"{self.md5.hexdigest()}"', "metadata": metadata,
            "created_at": datetime.now(UTC).isoformat(),
        }  # fmt: skip
        write_meta(self.bucket, self.key, meta)
        return {"Id": meta["id"], "Key": f"{self.bucket}/{self.key}"}


async def _receive(request: Request, upload: _Upload) -> None:
    """读取请求体：multipart（storage3 的方式，文件部分直接写盘）或原始字节"""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > upload.limit + FIELD_LIMIT:
        raise too_large()
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        upload.content_type = content_type or None
        if header := request.headers.get("x-metadata"):  # a raw body's user metadata: base64 of its JSON
            upload.fields["metadata"] = _unbase64(header)
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


def _unbase64(text: str) -> str:
    """x-metadata 头的内容（base64 解不开 → 空，与 Storage 一样忽略它）"""
    try:
        return base64.b64decode(text).decode()
    except ValueError:
        return ""


async def store_upload(request: Request, bucket: str, key: str, *, upsert: bool) -> dict:
    upload = _Upload(bucket, key, await bucket_limit(bucket))
    try:
        await _receive(request, upload)
        cache = upload.fields.get("cacheControl") or request.headers.get("cache-control") or "3600"
        return upload.commit(upsert=upsert, cache_control=f"max-age={cache}" if cache.isdigit() else cache)
    except BaseException:
        upload.discard()
        raise


def upsert_header(request: Request) -> bool:
    return request.headers.get("x-upsert", "").lower() == "true"


class ObjectResponse(FileResponse):
    """对象文件：只给一个字节范围；多段或写错的 Range → 416（Storage 不回 multipart/byteranges）"""

    @classmethod
    def _parse_range_header(cls, http_range: str, file_size: int) -> list[tuple[int, int]]:
        try:
            ranges = super()._parse_range_header(http_range, file_size)
        except MalformedRangeHeader:
            raise RangeNotSatisfiable(file_size) from None
        if len(ranges) != 1:
            raise RangeNotSatisfiable(file_size)
        return ranges


def file_response(request: Request, bucket: str, key: str, download: str | None = None) -> Response:
    """对象的下载响应：存下的内容类型与 ETag，If-None-Match 相符 → 304"""
    meta = read_meta(bucket, key)
    headers = {"cache-control": meta["cache_control"]}
    if meta["etag"]:
        headers["etag"] = meta["etag"]
        presented = {tag.strip() for tag in request.headers.get("if-none-match", "").split(",")}
        if meta["etag"] in presented or "*" in presented:
            return Response(status_code=304, headers=headers)
    kwargs = {}
    if download is not None:
        kwargs = {"filename": download or key.rsplit("/", 1)[-1], "content_disposition_type": "attachment"}
    # content-type given as a header: FileResponse would add "; charset=utf-8" to a text/* media type
    return ObjectResponse(object_file(bucket, key), headers={**headers, "content-type": meta["content_type"]}, **kwargs)


def expires_in(body: dict) -> int:
    try:
        seconds = int(body.get("expiresIn"))
    except (TypeError, ValueError):
        raise StorageError(400, "InvalidRequest", "expiresIn must be a number of seconds") from None
    if not 1 <= seconds <= MAX_SIGN_SECONDS:
        raise StorageError(400, "InvalidRequest", "expiresIn is out of range")
    return seconds


def signed_path(bucket: str, key: str, seconds: int) -> str:
    token = make_token(purpose="download", bucket=bucket, key=key, expires_at=int(time.time()) + seconds)
    # As Storage: the key unencoded (storage-js runs encodeURI over it, so an encoded one arrives encoded twice);
    # only "?" is escaped, which would otherwise start the query ("%" is refused in keys, so it cannot clash).
    return f"/object/sign/{bucket}/{key.replace('?', '%3F')}?token={token}"


async def json_body(request: Request) -> dict:
    try:
        body = await request.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise StorageError(400, "InvalidRequest", "The body must be a JSON object")
    return body
