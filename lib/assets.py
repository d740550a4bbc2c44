"""Assets: a user's media files. Uploads are typed by their bytes, then probed by the worker (pending → ready/rejected).

Reads run as the user (RLS: owners read their rows); writes are the server's (there is no write policy).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from datetime import UTC, datetime
from functools import cache
from typing import BinaryIO

from lib import db
from lib.config import get_settings
from lib.credits import get_credit_service
from lib.errors import Conflict, InvalidInput, NotFound, PayloadTooLarge, TooManyActiveTasks
from lib.media_types import UNNAMED_TYPES, UNSUPPORTED, MediaType, media_type_of, sniff
from lib.paging import page_after, page_of
from lib.projects import get_project_service
from lib.storage import HEAD_BYTES, SIGNED_UPLOAD_SECONDS, check_path, get_storage, user_path, with_signed_urls
from lib.tasks import PROBE_KEY_PREFIX

log = logging.getLogger("spool.assets")

PROBE_MODEL = "media.probe"
USER_FOLDERS = ("uploads", "tasks")  # everything stored for a user lies under {user_id}/ in one of these
REMOVE_BATCH = 1000  # the most paths Supabase Storage removes in one call
DEPARTED_SWEEP_SECONDS = 30  # a reaper pass's share for deleted accounts' files (the reaper has 2 minutes)
IN_MEMORY_UPLOAD_BYTES = 1024 * 1024  # a form file up to this size stays in memory (Starlette's spool limit)
# Past a signed upload URL's life: a PUT started before it expired may still be running (2 GiB over a slow line).
ABANDON_MARGIN_SECONDS = 60 * 60
TOMBSTONE = (
    "insert into public.upload_tombstones (path, user_id, expires_at)"
    " values (%s, %s, %s::timestamptz + make_interval(secs => %s)) on conflict (path) do nothing"
)
ASSET_COLUMNS = (
    "id, project_id, kind, mime, bytes, width, height, duration_s, fps, source_task_id, metadata, status, "
    "created_at, path"
)
# Reads also name the upload's check: the task keyed `probe:{asset id}` (as the upload's own answer does).
PROBE_TASK_OF_ASSET = (
    "(select t.id from public.tasks t where t.user_id = a.user_id"
    " and t.idempotency_key = %(probe_prefix)s || a.id::text) as probe_task_id"
)
# A page of the caller's assets (RLS); a project's page reads assets_project_created_idx (migration 20261208008200).
ASSET_PAGE = (
    f"select {ASSET_COLUMNS}, {PROBE_TASK_OF_ASSET} from public.assets a"
    " where (%(project)s::uuid is null or project_id = %(project)s)"
    " and (%(kind)s::text is null or kind = %(kind)s)"
    " and (%(status)s::text is null or status = %(status)s)"
    " and (%(at)s::timestamptz is null or (created_at, id) < (%(at)s, %(id)s::uuid))"
    " order by created_at desc, id desc limit %(limit)s"
)
EMPTY = "The file is empty."
SWEEP_AGE_SECONDS = SIGNED_UPLOAD_SECONDS + ABANDON_MARGIN_SECONDS  # its URL expired, and a PUT begun has had time
UPLOAD_EXPIRED = (
    f"The upload was not completed within {SWEEP_AGE_SECONDS // 3600} hours of its announcement; announce it again."
)
# The sweep's two scans, each served by a partial index (migration 20261208009100) so that a reaper pass never
# reads the whole assets table.
REJECTED_FILES = (
    "select id, path from public.assets where status = 'rejected' and source_task_id is null"
    " and not coalesce((metadata ->> 'file_removed')::boolean, false)"
    " and created_at < now() - make_interval(secs => %s) order by created_at limit %s"
)
UNCOMPLETED_UPLOADS = (
    "select a.id from public.assets a"
    " where a.status = 'pending' and a.created_at < now() - make_interval(secs => %s)"
    " and not exists (select 1 from public.tasks t"
    "   where t.user_id = a.user_id and t.idempotency_key = %s || a.id)"
    " order by a.created_at limit %s for update skip locked"
)
PROBE_COLUMNS = ("kind", "mime", "bytes", "width", "height", "duration_s", "fps")


class AssetService:
    """资源服务"""

    # ------------------------------------------------------------ uploads

    async def create_upload(
        self, *, user_id: str, content_type: str, size: int, filename: str | None = None, project_id: str | None = None
    ) -> dict:
        """登记一个待上传的资源并签发上传 URL"""
        media = media_type_of(content_type, filename)
        if media is None:
            raise InvalidInput(UNSUPPORTED, details=[{"field": "content_type", "message": "unsupported type"}])
        limit = get_settings().max_upload_bytes
        if size > limit:
            raise PayloadTooLarge(f"The file is too large (at most {limit} bytes).")
        asset_id, path = await self._upload_slot(user_id=user_id, media=media, project_id=project_id)
        signed = await get_storage().create_signed_upload_url(path=path, user_id=user_id)
        expires = datetime.fromtimestamp(signed["expires_at"], UTC)
        await self._record_upload(
            asset_id,
            user_id,
            project_id,
            media,
            path,
            size,
            filename,
            upload_expires_at=expires.isoformat().replace("+00:00", "Z"),
        )
        return {
            "asset_id": asset_id,
            "upload_url": signed["url"],
            "token": signed["token"],
            "expires_at": datetime.fromtimestamp(signed["expires_at"], UTC),
            "bucket": signed["bucket"],
            "path": signed["path"],
            "resumable_url": signed["resumable_url"],
        }

    async def complete_upload(self, *, user_id: str, asset_id: str) -> dict:
        """上传完成：确认对象存在、按字节判断类型，然后请 worker 探测"""
        asset = await self.get_asset(user_id=user_id, asset_id=asset_id, sign=False)
        if asset["status"] != "pending":
            raise Conflict(f"The asset is already {asset['status']}.")
        await _refuse_if_expired(asset_id)
        try:
            return await self._complete(user_id=user_id, asset_id=asset_id, asset=asset)
        except (Conflict, NotFound):
            # The sweep (or a delete) overtook it midway: say that, not "not uploaded yet" or "file not found".
            await _refuse_if_expired(asset_id)
            raise

    async def _complete(self, *, user_id: str, asset_id: str, asset: dict) -> dict:
        """complete 的检查与探测请求（调用方已确认 pending 且未过期）"""
        storage = get_storage()
        info = await storage.info(path=asset["path"], user_id=user_id)
        if info is None:
            raise Conflict("The file has not been uploaded yet.")
        if not info["size"]:  # nothing to sniff: a ranged read of an empty object is refused (416)
            await self._reject(asset, EMPTY, user_id)
            raise InvalidInput(EMPTY, details=[{"field": "file", "message": "empty"}])
        limit = get_settings().max_upload_bytes
        if info["size"] > limit:
            await self._reject(asset, f"The file is larger than {limit} bytes.", user_id)
            raise PayloadTooLarge(f"The file is too large (at most {limit} bytes).")
        if asset["bytes"] is not None and info["size"] > asset["bytes"]:  # the cap was checked on the announced size
            message = f"The file is {info['size']} bytes, more than the {asset['bytes']} announced for it."
            await self._reject(asset, message, user_id)
            raise PayloadTooLarge(message)
        media = sniff(await storage.read_head(path=asset["path"], user_id=user_id))
        if media is None:
            await self._reject(asset, UNSUPPORTED, user_id)
            raise InvalidInput(UNSUPPORTED, details=[{"field": "file", "message": "unsupported type"}])
        declared = (info.get("content_type") or "").split(";")[0].strip().lower()
        if declared not in UNNAMED_TYPES and media_type_of(declared) is None:
            # Storage serves the file with the type it was uploaded with: text/html would run in a browser.
            message = f"The file was uploaded as {declared}; upload it as {media.mime}."
            await self._reject(asset, message, user_id)
            raise InvalidInput(message, details=[{"field": "Content-Type", "message": "not a media type"}])
        asset = await self._set_type(asset_id, media, info["size"])
        return await self._request_probe(user_id=user_id, asset=asset)

    async def upload_direct(
        self, *, user_id: str, file: BinaryIO, filename: str | None = None, project_id: str | None = None
    ) -> dict:
        """小文件直传：判断类型、存入存储、登记为 pending 并请 worker 探测"""
        limit = get_settings().max_direct_upload_bytes
        size = file.seek(0, 2)
        file.seek(0)
        if size > limit:
            raise PayloadTooLarge(
                f"The file is too large for a direct upload (at most {limit} bytes); use POST /assets/uploads."
            )
        if size == 0:
            raise InvalidInput(EMPTY, details=[{"field": "file", "message": "empty"}])
        head = await asyncio.to_thread(file.read, HEAD_BYTES)
        media = sniff(head)
        if media is None:
            raise InvalidInput(UNSUPPORTED, details=[{"field": "file", "message": "unsupported type"}])
        asset_id, path = await self._upload_slot(user_id=user_id, media=media, project_id=project_id)
        storage = get_storage()
        if size <= IN_MEMORY_UPLOAD_BYTES:  # the form parser kept it in memory
            file.seek(0)
            data = await asyncio.to_thread(file.read)
            await storage.upload_bytes(path=path, data=data, content_type=media.mime, user_id=user_id, upsert=False)
        else:  # on disk: streamed, so concurrent uploads do not each hold their whole file in memory
            await storage.upload_open_file(path=path, file=file, content_type=media.mime, user_id=user_id, upsert=False)
        try:
            asset = await self._record_upload(asset_id, user_id, project_id, media, path, size, filename)
        except BaseException:
            await self._remove_quietly(path, user_id)
            raise
        return await self._request_probe(user_id=user_id, asset=asset)

    # ------------------------------------------------------------ reads and deletes

    async def get_asset(self, *, user_id: str, asset_id: str, sign: bool = True) -> dict:
        """查询自己的一个资源（他人的 → 404）；ready 时附下载 URL（重新签名或交出仍够新的）"""
        asset = await db.fetch_one_as(
            user_id,
            f"select {ASSET_COLUMNS}, {PROBE_TASK_OF_ASSET} from public.assets a where id = %(id)s",
            {"id": asset_id, "probe_prefix": PROBE_KEY_PREFIX},
        )
        if asset is None:
            raise NotFound("Asset not found.")
        return (await with_download_urls([asset]))[0] if sign else asset

    async def list_assets(
        self,
        *,
        user_id: str,
        project_id: str | None = None,
        kind: str | None = None,
        status: str | None = None,
        limit: int = 20,
        cursor: str | None = None,
    ) -> dict:
        """资源列表（可按项目、类型、状态筛选；最新在前，游标分页）"""
        after = page_after(cursor)
        rows = await db.fetch_all_as(
            user_id,
            ASSET_PAGE,
            {
                "project": project_id,
                "kind": kind,
                "status": status,
                **after,
                "limit": limit + 1,
                "probe_prefix": PROBE_KEY_PREFIX,
            },
        )
        page = page_of(rows, limit)
        return {**page, "items": await with_download_urls(page["items"])}

    async def delete_asset(self, *, user_id: str, asset_id: str) -> None:
        """删除资源：锁住行、确认没有未结束的任务读它，删存储对象，再删行（一个事务：存储失败则行留着，可重试）"""
        await self.get_asset(user_id=user_id, asset_id=asset_id, sign=False)  # 404 unless it is the user's
        async with db.transaction() as conn:
            # Locked before looking for readers: a task being created with this file holds it (FOR SHARE) until
            # it is committed, so it is found below; a task created after this lock finds the file gone.
            cur = await conn.execute(
                "select path, metadata from public.assets where id = %s and user_id = %s for update",
                (asset_id, user_id),
            )
            asset = await cur.fetchone()
            if asset is None:  # deleted meanwhile
                raise NotFound("Asset not found.")
            # A retry downloads its inputs again, and a provider job may already be paid for: the file stays until
            # the task ends. An upload's own check does not hold it (deleting a pending upload is how to stop one).
            cur = await conn.execute(
                "select id from public.tasks where user_id = %s and %s::uuid = any(input_asset_ids)"
                " and status in ('queued', 'processing') and model_key <> 'media.probe' limit 1",
                (user_id, asset_id),
            )
            reader = await cur.fetchone()
            if reader is not None:
                raise Conflict(
                    "A task that has not finished reads this file. Cancel the task or wait for it to end,"
                    " then delete it.",
                    details=[{"task_id": str(reader["id"])}],
                )
            # The poster its check made goes with it, unless an unfinished task reads the poster. Locked first and
            # looked up in a later statement, as the upload above: a task being created with the poster holds it
            # until it commits, and a lock wait does not refresh the statement's view of the tasks.
            cur = await conn.execute(
                "select a.id from public.assets a join public.tasks t on t.id = a.source_task_id"
                " where t.user_id = %s and t.idempotency_key = %s for update of a",
                (user_id, f"{PROBE_KEY_PREFIX}{asset_id}"),
            )
            cur = await conn.execute(
                "select a.id, a.path from public.assets a where a.id = any(%(ids)s::uuid[]) and not exists ("
                "   select 1 from public.tasks r where r.user_id = %(user)s and a.id = any(r.input_asset_ids)"
                "   and r.status in ('queued', 'processing'))",
                {"ids": [str(row["id"]) for row in await cur.fetchall()], "user": user_id},
            )
            posters = await cur.fetchall()
            if tombstone := _tombstone_for(asset, user_id):
                await conn.execute(*tombstone)
            await get_storage().remove(paths=[asset["path"], *(p["path"] for p in posters)], user_id=user_id)
            await conn.execute(
                "delete from public.assets where id = any(%s::uuid[])", ([asset_id, *(str(p["id"]) for p in posters)],)
            )

    # ------------------------------------------------------------ server side (the job runner)

    async def mark_probed(self, *, asset_id: str, probe: dict | None, reason: str | None) -> dict | None:
        """记录探测结果：ready（尺寸、时长、帧率等）或 rejected（原因）；只改 pending 的资源"""
        if reason is not None or not probe:
            reason = reason or "The file could not be probed."
            return await db.fetch_one(
                "update public.assets set status = 'rejected',"
                " metadata = metadata || jsonb_build_object('reject_reason', %s::text)"
                f" where id = %s and status = 'pending' returning {ASSET_COLUMNS}",
                (reason, asset_id),
            )
        facts = {key: probe.get(key) for key in PROBE_COLUMNS}
        if facts["kind"] not in ("image", "video", "audio"):
            facts["kind"] = None
        extra = {key: value for key, value in probe.items() if key not in PROBE_COLUMNS}
        return await db.fetch_one(
            # The type sniffed from the bytes at upload stays: FFmpeg names MP4 and QuickTime alike.
            "update public.assets set kind = coalesce(%(kind)s, kind), mime = coalesce(mime, %(mime)s),"
            " bytes = coalesce(%(bytes)s, bytes), width = %(width)s, height = %(height)s,"
            " duration_s = %(duration_s)s, fps = %(fps)s, metadata = metadata || %(extra)s::jsonb, status = 'ready'"
            f" where id = %(id)s and status = 'pending' returning {ASSET_COLUMNS}",
            {**facts, "extra": json.dumps(extra, default=str), "id": asset_id},
        )

    async def create_asset_record(
        self,
        *,
        user_id: str,
        kind: str,
        path: str,
        mime: str | None = None,
        size: int | None = None,
        width: int | None = None,
        height: int | None = None,
        duration_s: float | None = None,
        fps: float | None = None,
        source_task_id: str | None = None,
        project_id: str | None = None,
        metadata: dict | None = None,
        status: str = "ready",
        asset_id: str | None = None,
        conn=None,
    ) -> dict:
        """插入资源行（默认 ready；任务产出带 source_task_id）；可传入事务连接"""
        check_path(path, user_id)
        query = (
            "insert into public.assets (id, user_id, project_id, kind, bucket, path, mime, bytes, width, height,"
            " duration_s, fps, source_task_id, metadata, status)"
            # The project if it still exists: one deleted while its task ran leaves the result outside any project,
            # as its deletion left the task (on delete set null).
            " values (coalesce(%s::uuid, gen_random_uuid()), %s,"
            " (select p.id from public.projects p where p.id = %s::uuid and p.user_id = %s for key share),"
            " %s, %s, %s, %s, %s, %s, %s, %s, %s, %s,"
            f" %s::jsonb, %s) returning {ASSET_COLUMNS}"
        )
        params = (
            asset_id,
            user_id,
            project_id,
            user_id,  # only the owner's project, whatever the caller checked
            kind,
            get_settings().storage_bucket,
            path,
            mime,
            size,
            width,
            height,
            duration_s,
            fps,
            source_task_id,
            json.dumps(metadata or {}, default=str),
            status,
        )
        if conn is not None:
            return await (await conn.execute(query, params)).fetchone()
        return await db.fetch_one(query, params)

    # ------------------------------------------------------------ steps

    async def _upload_slot(self, *, user_id: str, media: MediaType, project_id: str | None) -> tuple[str, str]:
        """新上传的资源 id 与存储路径（先确认项目属于该用户、待检查的上传未超上限）"""
        if project_id:
            await get_project_service().require_owned(user_id=user_id, project_id=project_id)
        # Refused here before anything is stored or signed; _record_upload counts again under the account's lock.
        async with db.connection() as conn:
            await _require_upload_room(conn, user_id)
        asset_id = str(uuid.uuid4())
        return asset_id, user_path(user_id, "uploads", f"{asset_id}{media.ext}")

    async def _record_upload(
        self, asset_id, user_id, project_id, media: MediaType, path, size, filename, upload_expires_at=None
    ) -> dict:
        """登记待探测（pending）的上传（签名上传记下 URL 的过期时间）；账户锁下再数一次，同时的上传不会一起越过上限"""
        with db.user_must_exist():
            async with db.transaction() as conn:
                await conn.execute("select pg_advisory_xact_lock(hashtext('uploads:' || %s))", (user_id,))
                await _require_upload_room(conn, user_id)
                return await self.create_asset_record(
                    asset_id=asset_id,
                    user_id=user_id,
                    project_id=project_id,
                    kind=media.kind,
                    path=path,
                    mime=media.mime,
                    size=size,
                    metadata={
                        **({"filename": filename} if filename else {}),
                        **({"upload_expires_at": upload_expires_at} if upload_expires_at else {}),
                    },
                    status="pending",
                    conn=conn,
                )

    async def _request_probe(self, *, user_id: str, asset: dict) -> dict:
        """创建（幂等）零价的探测任务并派发"""
        from lib.tasks import get_task_service  # late: the task service may come to need assets

        asset_id = str(asset["id"])
        outcome = await get_credit_service().consume_credits(
            user_id=user_id,
            model_key=PROBE_MODEL,
            params={"asset_id": asset_id},
            cost=0,
            idempotency_key=f"{PROBE_KEY_PREFIX}{asset_id}",
            project_id=asset["project_id"] and str(asset["project_id"]),  # its check and poster go with the upload
            input_asset_ids=[asset_id],
        )
        task_id = str(outcome["task"]["id"])
        if outcome["created"]:
            await get_task_service().dispatch(task_id=task_id, model_key=PROBE_MODEL)
        return {**asset, "probe_task_id": task_id}

    async def _set_type(self, asset_id: str, media: MediaType, size: int) -> dict:
        row = await db.fetch_one(
            "update public.assets set kind = %s, mime = %s, bytes = %s where id = %s and status = 'pending'"
            f" returning {ASSET_COLUMNS}",
            (media.kind, media.mime, size, asset_id),
        )
        if row is None:
            raise Conflict("The asset is no longer pending.")
        return row

    async def reject_upload(self, *, asset_id: str, reason: str) -> None:
        """探测拒绝了上传：标为 rejected 并删掉文件（服务端，由 worker 调用）"""
        asset = await db.fetch_one("select id, user_id, path, metadata from public.assets where id = %s", (asset_id,))
        if asset is not None:
            await self._reject(asset, reason, str(asset["user_id"]))

    async def _reject(self, asset: dict, reason: str, user_id: str) -> None:
        """拒绝一个上传：标为 rejected，删掉文件；URL 还能用时留墓碑（否则它还能再传一次，文件无人认领）"""
        if await self.mark_probed(asset_id=str(asset["id"]), probe=None, reason=reason) is None:
            return  # already judged (a superseded check's late verdict) or gone: its file is not ours to remove
        if tombstone := _tombstone_for(asset, user_id):
            await db.execute(*tombstone)
        await self._remove_quietly(asset["path"], None)

    async def sweep_expired_uploads(self, *, limit: int = 500) -> int:
        """清理上传留下的文件：从未完成的上传（行与文件）、被拒绝的上传的文件、到期墓碑路径上后来传上的文件"""
        age = SWEEP_AGE_SECONDS
        # A check that crashed or was given up on rejects its upload in SQL, which cannot remove the file.
        rejected = await db.fetch_all(REJECTED_FILES, (age, limit))
        tombstones = await db.fetch_all(
            "select path from public.upload_tombstones where expires_at < now() order by expires_at limit %s", (limit,)
        )
        async with db.transaction() as conn:
            # Uploads never completed, locked until their rows are gone: a check being created for one (its
            # complete began in time) holds it and is skipped, and one created after this waits and finds it gone.
            # Looked at again in a later statement: a check committed just before the lock was taken is seen there.
            cur = await conn.execute(UNCOMPLETED_UPLOADS, (age, PROBE_KEY_PREFIX, limit))
            cur = await conn.execute(
                "select a.id, a.user_id, a.path from public.assets a"
                " where a.id = any(%s::uuid[]) and a.status = 'pending' and not exists (select 1 from public.tasks t"
                "   where t.user_id = a.user_id and t.idempotency_key = %s || a.id)",
                ([str(row["id"]) for row in await cur.fetchall()], PROBE_KEY_PREFIX),
            )
            rows = await cur.fetchall()
            if not rows and not rejected and not tombstones:
                return 0
            # Files first: if Storage fails the rows stay, and a retry finds them. A tombstone's path holds
            # whatever its URL sent after the delete.
            paths = [row["path"] for row in [*rows, *rejected, *tombstones]]
            for start in range(0, len(paths), REMOVE_BATCH):  # up to three lists of `limit`: over Storage's bulk cap
                await get_storage().remove(paths=paths[start : start + REMOVE_BATCH])
            await conn.execute(
                "delete from public.assets where id = any(%s::uuid[]) and status = 'pending'",
                ([row["id"] for row in rows],),
            )
            for row in rows:  # a PUT that was still running when its row went leaves its file to a later pass
                await conn.execute(TOMBSTONE, (row["path"], row["user_id"], "now", ABANDON_MARGIN_SECONDS))
            await conn.execute(
                "update public.assets set metadata = metadata || '{\"file_removed\": true}' where id = any(%s::uuid[])",
                ([row["id"] for row in rejected],),
            )
            await conn.execute(
                "delete from public.upload_tombstones where path = any(%s) and expires_at < now()",
                ([row["path"] for row in tombstones],),
            )
        log.info(
            "discarded %d uploads never completed, the files of %d rejected ones, and %d deleted ones",
            len(rows),
            len(rejected),
            len(tombstones),
        )
        return len(rows) + len(rejected) + len(tombstones)

    async def sweep_departed_users(self, *, budget_s: float = DEPARTED_SWEEP_SECONDS) -> int:
        """删除已注销用户留在存储里的文件（行已级联删除，文件不会）：每轮限时，边列边删；返回删除的文件数

        Each account is swept at once and again once every upload URL it held has expired (a PUT through one may
        land after the first sweep). A pass stops at its time budget; the next one lists again and goes on. An
        account whose sweep failed waits behind those not yet tried, so a few broken ones never block the rest.
        """
        late = SIGNED_UPLOAD_SECONDS + ABANDON_MARGIN_SECONDS
        rows = await db.fetch_all(
            "select user_id, now() as started, departed_at < now() - make_interval(secs => %s) as final"
            " from public.departed_users"
            " where swept_at is null or (swept_at < departed_at + make_interval(secs => %s)"
            "   and departed_at < now() - make_interval(secs => %s))"
            " order by tried_at nulls first, departed_at limit 20",
            (late, late, late),
        )
        storage, removed, deadline = get_storage(), 0, time.monotonic() + budget_s
        for row in rows:
            user_id = str(row["user_id"])
            try:
                for folder in USER_FOLDERS:
                    async for files in storage.walk(prefix=user_path(user_id, folder)):
                        for start in range(0, len(files), REMOVE_BATCH):
                            await storage.remove(paths=files[start : start + REMOVE_BATCH])
                        removed += len(files)
                        if time.monotonic() > deadline:
                            return removed  # the next pass lists again and goes on
            except Exception as exc:  # one account's trouble must not hold up the others: it goes to the back
                log.warning("could not remove the files of deleted account %s: %s", user_id, exc)
                await db.execute("update public.departed_users set tried_at = now() where user_id = %s", (user_id,))
                continue
            if row["final"]:
                await db.execute("delete from public.departed_users where user_id = %s", (user_id,))
            else:
                # The sweep's start: one that began before the URLs expired must run once more after.
                await db.execute(
                    "update public.departed_users set swept_at = %s, tried_at = null where user_id = %s",
                    (row["started"], user_id),
                )
            if time.monotonic() > deadline:
                break
        return removed

    async def _remove_quietly(self, path: str, user_id: str | None) -> None:
        try:
            await get_storage().remove(paths=[path], user_id=user_id)
        except Exception as exc:
            log.warning("could not remove %s: %s", path, exc)


async def _require_upload_room(conn, user_id: str) -> None:
    """未就绪的上传已达上限 → 429"""
    # Announced (a signed upload URL handed out) or being checked: each holds storage, and a check is a job
    # on our side, free to the user. Uploads never completed are swept once their URL expires.
    # A tombstone counts while its URL still works (it expires a margin after the URL).
    cur = await conn.execute(
        "select (select count(*) from public.assets where user_id = %(user)s and status = 'pending')"
        " + (select count(*) from public.upload_tombstones where user_id = %(user)s"
        "    and expires_at > now() + make_interval(secs => %(margin)s)) as n",
        {"user": user_id, "margin": ABANDON_MARGIN_SECONDS},
    )
    pending = (await cur.fetchone())["n"]
    if pending >= get_settings().max_upload_checks_per_user:
        raise TooManyActiveTasks(
            f"{pending} uploads are not ready yet; complete them or wait for their checks to finish."
        )


async def _refuse_if_expired(asset_id: str) -> None:
    """上传已被删除 → 404；没有检查、已超过清理的期限（与清理的条件相同，按数据库时钟）→ 409 过期"""
    row = await db.fetch_one(
        "select a.created_at < now() - make_interval(secs => %s) and not exists (select 1 from public.tasks t"
        "   where t.user_id = a.user_id and t.idempotency_key = %s || a.id) as past"
        " from public.assets a where a.id = %s",
        (SWEEP_AGE_SECONDS, PROBE_KEY_PREFIX, asset_id),
    )
    if row is None:
        raise NotFound("Asset not found.")
    if row["past"]:
        raise Conflict(UPLOAD_EXPIRED)


def _tombstone_for(asset: dict, user_id: str) -> tuple[str, tuple] | None:
    """上传 URL 仍可用时的墓碑语句：之后经它传上来的文件，清理时删掉；否则 None"""
    expires = (asset.get("metadata") or {}).get("upload_expires_at")
    if expires and datetime.fromisoformat(expires) > datetime.now(UTC):
        return TOMBSTONE, (asset["path"], user_id, expires, ABANDON_MARGIN_SECONDS)
    return None


async def with_download_urls(assets: list[dict]) -> list[dict]:
    """ready 的资源附上下载地址（重新签名或交出仍够新的，至多一次存储请求；文件已不在存储里 → null）"""
    return await with_signed_urls(assets, "download_url", lambda a: a["path"] if a["status"] == "ready" else None)


@cache
def get_asset_service() -> AssetService:
    """获取资源服务单例"""
    return AssetService()
