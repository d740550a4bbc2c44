"""Assets: signed uploads (then complete), small direct uploads, list, read with a download URL, delete."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any, Literal
from uuid import UUID

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from functions.auth import CurrentUserId
from functions.errors import ANSWER, Deleted, Envelope, ok
from functions.query import Filter, page_size
from lib.assets import get_asset_service
from lib.config import get_settings
from lib.errors import InvalidInput, PayloadTooLarge
from lib.fields import RequestBody, Whole, text_up_to

router = APIRouter(prefix="/assets", tags=["Assets"])

FORM_OVERHEAD = 64 * 1024  # boundaries, part headers and the small fields around the file
FORM_FIELDS = ("file", "project_id")  # what a direct upload's form may hold
AssetKind = Literal["image", "video", "audio"]
AssetStatus = Literal["pending", "ready", "rejected"]


class AssetUploadCreate(RequestBody):
    content_type: str = Field(
        max_length=100,
        examples=["video/mp4"],
        description="The file's type (the browser's `file.type`); when empty, the type `filename` names.",
    )
    bytes: Whole = Field(gt=0, description="Size of the file that will be uploaded.")
    filename: text_up_to(255) | None = None
    project_id: UUID | None = None


class AssetUploadTicket(BaseModel):
    asset_id: UUID
    upload_url: str = Field(description="PUT the file here (raw body or multipart field 'file'), then complete.")
    token: str = Field(description="The signed upload token; for a resumable upload, send it as `x-signature`.")
    expires_at: datetime
    bucket: str = Field(description="The Storage bucket: `bucketName` in a resumable upload's metadata.")
    path: str = Field(description="The object's path in the bucket: `objectName` in a resumable upload's metadata.")
    resumable_url: str = Field(
        description="The TUS endpoint for a resumable upload of the same object with the same token (6 MiB chunks)."
    )


class AssetPublic(BaseModel):
    model_config = ANSWER

    id: UUID
    project_id: UUID | None
    kind: AssetKind
    status: AssetStatus
    mime: str | None
    bytes: int | None
    width: int | None
    height: int | None
    duration_s: float | None
    fps: float | None
    source_task_id: UUID | None
    metadata: dict[str, Any]
    created_at: datetime
    download_url: str | None = None
    probe_task_id: UUID | None = None


class AssetPage(BaseModel):
    items: list[AssetPublic]
    next_cursor: str | None


DIRECT_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {"schema": {
            "type": "object", "required": ["file"],
            "properties": {"file": {"type": "string", "format": "binary"},
                           "project_id": {"type": "string", "format": "uuid"}},
        }}},
    }
}  # fmt: skip


async def _limited(stream: AsyncIterator[bytes], limit: int) -> AsyncIterator[bytes]:
    seen = 0
    async for chunk in stream:
        seen += len(chunk)
        if seen > limit:
            raise PayloadTooLarge(_too_large())
        yield chunk


def _too_large() -> str:
    return (
        f"The file is too large for a direct upload (at most {get_settings().max_direct_upload_bytes} bytes);"
        " use POST /assets/uploads."
    )


async def read_upload_form(request: Request):
    """解析 multipart 表单（边读边限长，超过直传上限立即 413）"""
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise InvalidInput(
            "Send the file as multipart/form-data in the field 'file'.",
            details=[{"field": "file", "message": "multipart/form-data expected"}],
        )
    limit = get_settings().max_direct_upload_bytes + FORM_OVERHEAD
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(_too_large())
    parser = MultiPartParser(request.headers, _limited(request.stream(), limit), max_files=1, max_fields=5)
    try:
        return await parser.parse()
    except MultiPartException as exc:
        raise InvalidInput(exc.message, details=[{"field": "file", "message": exc.message}]) from None


def _refuse_unknown_fields(form) -> None:
    """表单里不认识的字段 → 422（拼错的 project_id 不会被悄悄忽略）"""
    unknown = sorted({name for name in form.keys() if name not in FORM_FIELDS})
    if unknown:
        raise InvalidInput(
            "The request is not valid.",
            details=[{"field": name, "message": "Extra inputs are not permitted"} for name in unknown],
        )


def _project_field(value: Any) -> str | None:
    if value in (None, ""):
        return None
    try:
        return str(UUID(str(value)))
    except ValueError:
        raise InvalidInput(
            "project_id is not a valid id.", details=[{"field": "project_id", "message": "not a UUID"}]
        ) from None


def _form_filename(value: str | None) -> str | None:
    # The browser's name for the file, kept as a label: made storable rather than refused.
    if not value:
        return None
    return value.encode(errors="replace").decode().replace("\x00", "")[:255] or None


@router.post("/uploads", status_code=201, response_model=Envelope[AssetUploadTicket])
async def create_upload(body: AssetUploadCreate, user_id: CurrentUserId):
    """登记上传并签发上传 URL"""
    ticket = await get_asset_service().create_upload(
        user_id=user_id,
        content_type=body.content_type,
        size=body.bytes,
        filename=body.filename,
        project_id=str(body.project_id) if body.project_id else None,
    )
    return ok(AssetUploadTicket.model_validate(ticket))


@router.post("/{asset_id}/complete", response_model=Envelope[AssetPublic])
async def complete_upload(asset_id: UUID, user_id: CurrentUserId):
    """上传完成：检查文件类型并开始探测"""
    return ok(
        AssetPublic.model_validate(await get_asset_service().complete_upload(user_id=user_id, asset_id=str(asset_id)))
    )


@router.post("", status_code=201, openapi_extra=DIRECT_UPLOAD_BODY, response_model=Envelope[AssetPublic])
async def upload_direct(request: Request, user_id: CurrentUserId):
    """小文件直传（multipart 字段 file，可选 project_id）"""
    form = await read_upload_form(request)
    try:
        _refuse_unknown_fields(form)
        file = form.get("file")
        if not isinstance(file, UploadFile):
            raise InvalidInput("The form has no file.", details=[{"field": "file", "message": "required"}])
        asset = await get_asset_service().upload_direct(
            user_id=user_id,
            file=file.file,
            filename=_form_filename(file.filename),
            project_id=_project_field(form.get("project_id")),
        )
    finally:
        await form.close()
    return ok(AssetPublic.model_validate(asset))


@router.get("", response_model=Envelope[AssetPage])
async def list_assets(
    user_id: CurrentUserId,
    project_id: Filter[UUID] = None,
    kind: Filter[AssetKind] = None,
    status: Filter[AssetStatus] = None,
    limit: page_size(100) = 20,
    cursor: str | None = None,
):
    """资源列表"""
    return ok(
        AssetPage.model_validate(
            await get_asset_service().list_assets(
                user_id=user_id,
                project_id=str(project_id) if project_id else None,
                kind=kind,
                status=status,
                limit=limit,
                cursor=cursor,
            )
        )
    )


@router.get("/{asset_id}", response_model=Envelope[AssetPublic])
async def get_asset(asset_id: UUID, user_id: CurrentUserId):
    """查询资源（ready 时附下载 URL，至少还有 SIGNED_URL_SECONDS 有效）"""
    return ok(AssetPublic.model_validate(await get_asset_service().get_asset(user_id=user_id, asset_id=str(asset_id))))


@router.delete("/{asset_id}", response_model=Envelope[Deleted])
async def delete_asset(asset_id: UUID, user_id: CurrentUserId):
    """删除资源（连同存储对象）"""
    await get_asset_service().delete_asset(user_id=user_id, asset_id=str(asset_id))
    return ok({"id": str(asset_id), "deleted": True})
