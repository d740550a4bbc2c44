"""Local migrations: the Supabase shim, then new files of supabase/migrations in order, then the seed.

Applied migrations are recorded in supabase_migrations.schema_migrations, the table
the Supabase CLI keeps, so a second start applies nothing. The shim, the local
Realtime feed and the seed are re-applied only when one of the SQL files changed
(a fingerprint of them all is kept in spool_local.state): their DDL locks tables,
and a server or worker starting beside a live one must not contend with its writes.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import psycopg

from lib.local.errors import StackError

ROOT = Path(__file__).resolve().parents[2]
MIGRATIONS = ROOT / "supabase" / "migrations"
SEED = ROOT / "supabase" / "seed.sql"
SHIM = Path(__file__).with_name("supabase_shim.sql")
REALTIME_FEED = Path(__file__).with_name("realtime_feed.sql")  # local Realtime triggers

log = logging.getLogger("spool.local.migrate")


def migration_files() -> list[Path]:
    """按版本顺序列出迁移文件"""
    return sorted(MIGRATIONS.glob("*.sql"))


def sql_fingerprint() -> str:
    """shim、迁移、实时触发器与种子文件的指纹"""
    digest = hashlib.sha256()
    for path in (SHIM, *migration_files(), REALTIME_FEED, SEED):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _applied_fingerprint(conn: psycopg.Connection) -> str | None:
    if conn.execute("select to_regclass('spool_local.state')").fetchone()[0] is None:
        return None
    row = conn.execute("select value from spool_local.state where key = 'sql_fingerprint'").fetchone()
    return row[0] if row else None


def migrate(db_url: str, *, signup_credits: int | None = None) -> list[str]:
    """应用 shim、新迁移与种子数据，返回本次应用的迁移版本"""
    applied: list[str] = []
    fingerprint = sql_fingerprint()
    conn = psycopg.connect(db_url, autocommit=True)
    try:
        # One migrator at a time (dev server, worker and tests may start together). The lock goes with the
        # connection: closing it releases the lock also when a Ctrl-C cut a statement short, and close() (unlike
        # leaving a `with` block) sends no rollback to a connection still busy with that statement.
        conn.execute("select pg_advisory_lock(hashtext('spool.migrate'))")
        if _applied_fingerprint(conn) != fingerprint:
            applied = _apply_all(conn, fingerprint)
        if signup_credits is not None:
            conn.execute(
                "update public.app_settings set value = to_jsonb(%s::bigint), updated_at = now()"
                " where key = 'signup_credits' and value <> to_jsonb(%s::bigint)",
                (signup_credits, signup_credits),
            )
    except psycopg.Error as exc:
        if isinstance(exc.__context__, KeyboardInterrupt):  # Ctrl-C mid-statement: the rollback after it fails too
            raise KeyboardInterrupt from None
        raise
    finally:
        conn.close()
    return applied


def _apply_all(conn: psycopg.Connection, fingerprint: str) -> list[str]:
    """应用 shim、尚未应用的迁移、实时触发器与种子，并记下指纹"""
    applied: list[str] = []
    _run(conn, SHIM)
    conn.execute(
        "create schema if not exists supabase_migrations;"
        "create table if not exists supabase_migrations.schema_migrations"
        " (version text primary key, statements text[], name text)"
    )
    done = {row[0] for row in conn.execute("select version from supabase_migrations.schema_migrations")}
    for path in migration_files():
        version, _, name = path.stem.partition("_")
        if version in done:
            continue
        sql = path.read_text()
        with conn.transaction():
            _run(conn, path, sql)
            conn.execute(
                "insert into supabase_migrations.schema_migrations (version, statements, name) values (%s, %s, %s)",
                (version, [sql], name),
            )
        applied.append(version)
        log.info("applied migration %s", path.name)
    _run(conn, REALTIME_FEED)
    _run(conn, SEED)
    conn.execute(
        "create schema if not exists spool_local;"
        "revoke all on schema spool_local from public;"
        "create table if not exists spool_local.state (key text primary key, value text not null);"
        "alter table spool_local.state enable row level security"
    )
    conn.execute(
        "insert into spool_local.state (key, value) values ('sql_fingerprint', %s)"
        " on conflict (key) do update set value = excluded.value",
        (fingerprint,),
    )
    return applied


def _run(conn: psycopg.Connection, path: Path, sql: str | None = None) -> None:
    """执行一个 SQL 文件；失败时报出文件名（它在一个事务里，什么都没留下）"""
    try:
        conn.execute(sql if sql is not None else path.read_text())
    except psycopg.Error as exc:
        detail = " ".join(str(exc).split())
        name = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        raise StackError(f"{name} failed, nothing of it was applied: {detail}") from None
