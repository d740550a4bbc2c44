"""The change feed: LISTEN for change ids, read the rows, let Postgres RLS decide who sees each one, fan out.

One listener connection and one query connection per server process. The rows
come from realtime_local.changes (realtime_feed.sql); NOTIFY carries only ids.
Visibility is what Supabase Realtime does (realtime.apply_rls): for INSERT and
UPDATE, a lookup of the row by primary key run as the subscriber (role +
request.jwt.claims), one query per distinct set of claims and table for a whole
batch of changes. A deleted row cannot be looked up, so a DELETE goes to every
subscriber whose role may read the table and whose filters match the old row,
and under RLS its old record carries only the primary key: exactly as in the
cloud, so a client that subscribes without a filter sees here what it would see
there.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from lib.local.realtime.bindings import Binding
from lib.local.realtime.channels import Channel, Hub
from lib.local.realtime.protocol import Frame, dumps, encode

log = logging.getLogger("spool.local.realtime")

NOTIFY_CHANNEL = "spool_realtime"
PUBLICATION = "supabase_realtime"
BATCH_MAX = 500
KEEP_CHANGES = "10 minutes"
PRUNE_EVERY_S = 60.0
LIVENESS_EVERY_S = 15.0
MAX_RECORD_BYTES = 1024 * 1024  # Supabase Realtime's default; larger records lose their big fields
MAX_IN_VALUES = 100  # Supabase Realtime refuses an `in` filter with more values
RECENT_IDS = 20_000
TICK = object()

CHANGES_SQL = (
    "select id, schema_name, table_name, type, record, old_record,"
    " to_char(committed_at at time zone 'utc', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"') as commit_timestamp"
    " from realtime_local.changes where id = any(%s)"
)
TABLES_SQL = """
select n.nspname as schema, c.relname as table, format('%%I.%%I', n.nspname, c.relname) as rel, c.relrowsecurity as rls,
  c.relreplident = 'f' as full_identity,
  (select array_agg(a.attname::text order by array_position(i.indkey::int2[], a.attnum))
     from pg_catalog.pg_index i
     join pg_catalog.pg_attribute a on a.attrelid = i.indrelid and a.attnum = any (i.indkey::int2[])
    where i.indrelid = c.oid and i.indisprimary) as pk,
  (select jsonb_agg(jsonb_build_object('name', a.attname, 'type', t.typname) order by a.attnum)
     from pg_catalog.pg_attribute a join pg_catalog.pg_type t on t.oid = a.atttypid
    where a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped) as columns,
  has_table_privilege('authenticated', c.oid, 'select') as authenticated_select,
  has_table_privilege('anon', c.oid, 'select') as anon_select
from pg_catalog.pg_publication_tables p
join pg_catalog.pg_namespace n on n.nspname = p.schemaname
join pg_catalog.pg_class c on c.relnamespace = n.oid and c.relname = p.tablename
where p.pubname = %s
"""


@dataclass(frozen=True, slots=True)
class TableMeta:
    """一张已发布表的目录信息"""

    schema: str
    table: str
    rel: str
    rls: bool
    full_identity: bool
    pk: tuple[str, ...]
    columns: list[dict]
    selectable: frozenset[str]  # roles with SELECT on the table

    @property
    def column_names(self) -> set[str]:
        return {c["name"] for c in self.columns}

    def pk_of(self, row: dict) -> str:
        return dumps({c: row.get(c) for c in sorted(self.pk)})


@dataclass(slots=True)
class Change:
    """一条已捕获的行变更"""

    id: int
    schema: str
    table: str
    type: str
    record: dict | None
    old_record: dict | None
    commit_timestamp: str

    @property
    def row(self) -> dict | None:
        return self.old_record if self.type == "DELETE" else self.record


class ChangeFeed:
    """LISTEN/NOTIFY 驱动的变更流（断线自动重连）"""

    def __init__(self, hub: Hub, db_url: str):
        self.hub = hub
        self.db_url = db_url
        self.ready = asyncio.Event()
        self.tables: dict[tuple[str, str], TableMeta] = {}
        self.floor: int | None = None  # the newest change when the feed first listened: older ones are not ours
        self.delivered = 0
        self._recent: OrderedDict[int, None] = OrderedDict()
        self._task: asyncio.Task | None = None
        self._last_refresh = 0.0
        self._last_prune = 0.0
        self._checker: psycopg.AsyncConnection | None = None  # joins' catalog and filter checks, one at a time
        self._checker_lock = asyncio.Lock()

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        """启动（已在运行则不做什么）"""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="realtime-feed")

    async def stop(self) -> None:
        """停止并关闭数据库连接"""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
            self._task = None
        self.ready.clear()
        if self._checker is not None:
            await self._checker.close()
            self._checker = None

    async def wait_ready(self, wait_s: float) -> bool:
        """等到正在监听（或超时）"""
        self.start()
        try:
            await asyncio.wait_for(self.ready.wait(), wait_s)
        except TimeoutError:
            return False
        return True

    async def _connect(self, name: str) -> psycopg.AsyncConnection:
        return await psycopg.AsyncConnection.connect(
            self.db_url, autocommit=True, prepare_threshold=None, application_name=name, connect_timeout=5
        )

    async def _check(self, sql: str, params: tuple) -> list[tuple]:
        """在共用的检查连接上执行一条查询（加入频道时用；断了就重连一次）"""
        async with self._checker_lock:
            for retry in (True, False):
                if self._checker is None or self._checker.closed:
                    self._checker = await self._connect("spool-realtime-check")
                    await self._checker.execute("set statement_timeout = '10s'")
                try:
                    cur = await self._checker.execute(sql, params)
                    return await cur.fetchall()
                except psycopg.OperationalError:
                    await self._checker.close()
                    if not retry:
                        raise
        raise AssertionError("unreachable")

    async def _run(self) -> None:
        delay = 0.2
        while True:
            started = time.monotonic()
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.ready.clear()
                if time.monotonic() - started > 10:
                    delay = 0.2
                log.warning("realtime feed lost the database (%s); reconnecting in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _session(self) -> None:
        async with (
            await self._connect("spool-realtime-listen") as listen,
            await self._connect("spool-realtime-query") as query,
        ):
            await query.execute("set statement_timeout = '10s'")
            await listen.execute(f"listen {NOTIFY_CHANNEL}")
            await self._load_tables(query)
            queue: asyncio.Queue = asyncio.Queue()
            if self.floor is None:
                cur = await query.execute("select coalesce(max(id), 0) from realtime_local.changes")
                self.floor = (await cur.fetchone())[0]
            else:
                await self._catch_up(query, queue)
            reader = asyncio.create_task(self._read(listen, queue), name="realtime-listen")
            self.ready.set()
            log.info("realtime feed listening on %s", NOTIFY_CHANNEL)
            try:
                while True:
                    ids = await self._next_batch(queue)
                    if ids:
                        try:
                            await self._dispatch(query, ids)
                        except psycopg.OperationalError:
                            raise  # not marked as seen: the catch-up after reconnecting delivers them
                        except Exception:  # this batch only: given up, so it cannot stall the feed for ever
                            log.exception("realtime feed could not deliver changes %s..%s", min(ids), max(ids))
                        self._seen(ids)
                    if time.monotonic() - self._last_prune > PRUNE_EVERY_S:
                        await self._prune(query)
            finally:
                self.ready.clear()
                reader.cancel()

    async def _catch_up(self, query: psycopg.AsyncConnection, queue: asyncio.Queue) -> None:
        """重连后补发断线期间提交的变更：已记录的最早 id 之后、尚未发出的每一条（事务不按 id 顺序提交）"""
        since = max(self.floor or 0, min(self._recent, default=0))
        cur = await query.execute("select id from realtime_local.changes where id > %s order by id", (since,))
        for (change_id,) in await cur.fetchall():
            if change_id not in self._recent:
                queue.put_nowait(change_id)

    def _seen(self, ids: list[int]) -> None:
        """记下已处理的变更（之后的通知与补发都跳过它们）"""
        for change_id in ids:
            self._recent[change_id] = None
        while len(self._recent) > RECENT_IDS:
            self._recent.popitem(last=False)

    async def _read(self, listen: psycopg.AsyncConnection, queue: asyncio.Queue) -> None:
        try:
            while True:
                async for notify in listen.notifies(timeout=LIVENESS_EVERY_S):
                    queue.put_nowait(int(notify.payload))
                await listen.execute("select 1")  # a dead connection shows up here
                queue.put_nowait(TICK)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            queue.put_nowait(exc)

    async def _next_batch(self, queue: asyncio.Queue) -> list[int]:
        items = [await queue.get()]
        while len(items) < BATCH_MAX and not queue.empty():
            items.append(queue.get_nowait())
        ids = []
        for item in items:
            if isinstance(item, Exception):
                raise item
            if item is not TICK and item not in self._recent and item not in ids:  # a catch-up may meet its notify
                ids.append(item)
        return ids

    async def _prune(self, query: psycopg.AsyncConnection) -> None:
        self._last_prune = time.monotonic()
        await query.execute(
            f"delete from realtime_local.changes where committed_at < now() - interval '{KEEP_CHANGES}'"
        )

    # -- catalog -------------------------------------------------------------------

    async def _load_tables(self, conn: psycopg.AsyncConnection | None = None) -> None:
        if conn is None:
            rows = await self._check(TABLES_SQL, (PUBLICATION,))
        else:
            rows = await (await conn.execute(TABLES_SQL, (PUBLICATION,))).fetchall()
        tables = {}
        for schema, table, rel, rls, full_identity, pk, columns, auth_sel, anon_sel in rows:
            roles = frozenset(r for r, ok in (("authenticated", auth_sel), ("anon", anon_sel)) if ok)
            tables[(schema, table)] = TableMeta(
                schema, table, rel, rls, full_identity, tuple(pk or ()), columns or [], roles
            )
        self.tables = tables
        self._last_refresh = time.monotonic()

    async def refresh_tables(self) -> None:
        """重新读取发布表（订阅了未知的表时，至多每秒一次）"""
        if time.monotonic() - self._last_refresh < 1.0:
            return
        await self._load_tables()

    async def check_bindings(self, bindings: list[Binding]) -> list[str]:
        """检查过滤串可解析、订阅的表在发布中、过滤列存在、过滤值能转成列的类型（in 至多 100 个值）；返回问题列表"""
        problems = []
        for b in bindings:
            if b.problem:
                problems.append(b.problem)
                continue
            if not self._resolve(b):
                try:
                    await self.refresh_tables()
                except psycopg.Error as exc:
                    log.warning("could not refresh the published tables: %s", exc)
            filters = [f"{c.column}={c.op}" for c in b.conditions]
            if not self._resolve(b):
                problems.append(
                    "Unable to subscribe to changes with given parameters. Please check Realtime is enabled for the"
                    f" given connect parameters: [schema: {b.schema}, table: {b.table}, filters: {filters}]"
                )
            elif error := await self._filter_error(b):
                problems.append(
                    "Unable to subscribe to changes with given parameters. An exception happened so please check your"
                    f" connect parameters: [schema: {b.schema}, table: {b.table}, filters: {filters}]."
                    f" Exception: {error}"
                )
        return problems

    async def _filter_error(self, b: Binding) -> str | None:
        """像 Supabase 的 subscription_check_filters：值转不成列的类型、in 超过 100 个值 → 错误信息"""
        values = []
        for c in b.conditions:
            if c.op == "in" and len(c.values) > MAX_IN_VALUES:
                return f"too many values for `in` filter. Maximum {MAX_IN_VALUES}"
            if c.op != "is":
                values += [{"value": v, "type": c.type} for v in c.values]
        if not values:
            return None
        rows = await self._check(
            "select e.message from jsonb_to_recordset(%s) as v(value text, type text),"
            " lateral pg_catalog.pg_input_error_info(v.value, v.type) e where e.message is not null limit 1",
            (Jsonb(values),),
        )
        return rows[0][0] if rows else None

    def _resolve(self, b: Binding) -> bool:
        """Whether the table and the filter columns are published; types the filter conditions as the columns."""
        if b.table == "*":
            return any(b.schema in ("*", s) for s, _ in self.tables)
        meta = self.tables.get((b.schema, b.table))
        if meta is None or not all(c.column in meta.column_names for c in b.conditions):
            return False
        types = {c["name"]: c["type"] for c in meta.columns}
        b.conditions = tuple(replace(c, type=types[c.column]) for c in b.conditions)  # compared as those types
        return True

    # -- fan-out -------------------------------------------------------------------

    async def _dispatch(self, query: psycopg.AsyncConnection, ids: list[int]) -> None:
        cur = await query.execute(CHANGES_SQL, (ids,))
        order = {change_id: i for i, change_id in enumerate(ids)}
        changes = sorted((Change(*row) for row in await cur.fetchall()), key=lambda c: order[c.id])

        # Each channel's claims as they were when the batch was planned: a token refreshed while the batch is
        # checked must not lose the batch's changes.
        plan: list[tuple[Change, TableMeta, Channel, list[int], tuple[str, str]]] = []
        for change in changes:
            meta = self.tables.get((change.schema, change.table))
            if meta is None or not meta.pk:
                continue
            row = change.row
            for channel in self.hub.channels_for(change.schema, change.table):
                if channel.role not in meta.selectable:
                    continue
                matched = [b.id for b in channel.bindings if _covers(b, change) and b.wants(change.type, row)]
                if matched:
                    plan.append((change, meta, channel, matched, (channel.role, channel.claims_json)))
        if not plan:
            return
        visible = await self._visible(query, plan)
        encoded: dict[int, str] = {}
        for change, meta, channel, matched, (_, claims) in plan:
            if (claims, change.id) not in visible or not channel.active:  # left or closed meanwhile: nothing
                continue
            data = encoded.get(change.id)
            if data is None:
                data = encoded[change.id] = dumps(_payload_data(change, meta))
            frame = Frame(channel.topic, "postgres_changes", None, None, channel.join_ref)
            payload = f'{{"ids":{dumps(matched)},"data":{data}}}'
            channel.conn.send_text(encode(frame, channel.conn.vsn, payload_json=payload))
            self.delivered += 1

    async def _visible(self, query: psycopg.AsyncConnection, plan: list) -> set[tuple[str, int]]:
        """在 Postgres 中按订阅者身份判断可见性（整批一次往返），返回 {(claims, change id)}"""
        checks: dict[tuple[str, str], dict] = {}  # (claims, rel) -> check
        by_key: dict[tuple[str, str], dict[str, list[int]]] = {}  # (claims, rel) -> pk -> change ids
        visible: set[tuple[str, int]] = set()
        for change, meta, _, _, (role, claims) in plan:
            if change.type == "DELETE":  # as the cloud: no row left to check, the filters alone decide
                visible.add((claims, change.id))
                continue
            group = (claims, meta.rel)
            check = checks.get(group)
            if check is None:
                check = checks[group] = {
                    "role": role,
                    "claims": claims,
                    "rel": meta.rel,
                    "pk": list(meta.pk),
                    "keys": [],
                }
                by_key[group] = {}
            pk = meta.pk_of(change.row)
            ids = by_key[group].setdefault(pk, [])
            if not ids:
                check["keys"].append({c: change.row.get(c) for c in meta.pk})
            ids.append(change.id)
        if not checks:
            return visible
        groups = list(checks)
        # One statement (its own transaction): the role and claims it sets end with it.
        cur = await query.execute(
            "select check_no, item from realtime_local.visible_rows(%s)", (Jsonb(list(checks.values())),)
        )
        for check_no, item in await cur.fetchall():
            group = groups[check_no]
            for change_id in by_key[group].get(dumps({k: item.get(k) for k in sorted(item)}), ()):
                visible.add((group[0], change_id))
        return visible


def _covers(binding: Binding, change: Change) -> bool:
    return binding.schema in ("*", change.schema) and binding.table in ("*", change.table)


def _payload_data(change: Change, meta: TableMeta) -> dict:
    """与 Supabase Realtime 相同形状的 data"""
    data: dict[str, Any] = {
        "schema": change.schema,
        "table": change.table,
        "commit_timestamp": change.commit_timestamp,
        "type": change.type,
        "columns": meta.columns,
    }
    errors = None
    if change.type in ("INSERT", "UPDATE"):
        data["record"] = change.record
    if change.type == "UPDATE":
        data["old_record"] = change.old_record if meta.full_identity else _pk_only(change.old_record, meta)
    if change.type == "DELETE":
        # As in the cloud: with RLS on, a delete's old record carries only the primary key.
        full = meta.full_identity and not meta.rls
        data["old_record"] = change.old_record if full else _pk_only(change.old_record, meta)
    if len(dumps(data).encode()) > MAX_RECORD_BYTES:
        for name in ("record", "old_record"):
            if data.get(name):
                data[name] = {k: v for k, v in data[name].items() if len(dumps(v).encode()) <= 64}
        errors = ["Error 413: Payload Too Large"]
    data["errors"] = errors
    return data


def _pk_only(row: dict | None, meta: TableMeta) -> dict:
    return {c: (row or {}).get(c) for c in meta.pk}
