"""Local migrations: the Supabase shim, then new files of supabase/migrations in order, then the seed.

Applied migrations are recorded in supabase_migrations.schema_migrations, the table
the Supabase CLI keeps, so a second start applies nothing.
"""

from __future__ import annotations

import logging
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parents[2]
MIGRATIONS = ROOT / "supabase" / "migrations"
SEED = ROOT / "supabase" / "seed.sql"
SHIM = Path(__file__).with_name("supabase_shim.sql")
REALTIME_FEED = Path(__file__).with_name("realtime_feed.sql")  # local Realtime triggers, re-applied every start

log = logging.getLogger("spool.local.migrate")


def migration_files() -> list[Path]:
    """按版本顺序列出迁移文件"""
    return sorted(MIGRATIONS.glob("*.sql"))


def migrate(db_url: str, *, signup_credits: int | None = None) -> list[str]:
    """应用 shim、新迁移与种子数据，返回本次应用的迁移版本"""
    applied: list[str] = []
    with psycopg.connect(db_url, autocommit=True) as conn:
        # One migrator at a time (dev server, worker and tests may start together).
        conn.execute("select pg_advisory_lock(hashtext('spool.migrate'))")
        try:
            conn.execute(SHIM.read_text())
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
                    conn.execute(sql)
                    conn.execute(
                        "insert into supabase_migrations.schema_migrations (version, statements, name)"
                        " values (%s, %s, %s)",
                        (version, [sql], name),
                    )
                applied.append(version)
                log.info("applied migration %s", path.name)
            conn.execute(REALTIME_FEED.read_text())
            conn.execute(SEED.read_text())
            if signup_credits is not None:
                conn.execute(
                    "update public.app_settings set value = to_jsonb(%s::bigint), updated_at = now()"
                    " where key = 'signup_credits'",
                    (signup_credits,),
                )
        finally:
            conn.execute("select pg_advisory_unlock(hashtext('spool.migrate'))")
    return applied
