"""The schema: migrations, row level security on every table, service-role-only functions, the signup grant."""

import json
import uuid

import psycopg
import pytest
from psycopg.rows import dict_row

from lib.local.migrate import migrate, migration_files

PUBLIC_TABLES = {
    "app_settings",
    "profiles",
    "credit_accounts",
    "credit_ledger",
    "projects",
    "assets",
    "tasks",
    "task_job_states",
    "task_output_sweeps",
    "credit_packages",
    "purchases",
    "stripe_events",
    "upload_tombstones",
    "departed_users",
}
SERVICE_FUNCTIONS = [
    "create_task(uuid, text, jsonb, bigint, text, uuid, uuid[], int)",
    "finish_task(uuid, text, jsonb, text, jsonb, text, int)",
    "grant_credits(uuid, bigint, text, text)",
    "claim_task(uuid, text)",
    "claim_next_task(text[], text)",
    "requeue_worker_tasks(text, int)",
    "report_task_progress(uuid, int, real, text)",
    "requeue_task(uuid, int, int, text)",
    "release_task(uuid, int, text)",
    "reap_tasks(int, int, int, int)",
    "set_task_dispatch(uuid, text, text)",
    "start_task_dispatch(uuid)",
    "reclaim_task(uuid, text, int)",
    "save_task_state(uuid, int, jsonb)",
    "take_task_output_sweeps(int, int)",
    "forget_task_output_sweep(uuid)",
    "require_account(uuid)",
]


def new_user(conn, email=None) -> str:
    user_id = str(uuid.uuid4())
    conn.execute("insert into auth.users (id, email) values (%s, %s)", (user_id, email or f"{user_id}@example.com"))
    return user_id


def as_role(conn, role: str, user_id: str | None = None):
    conn.execute("select set_config('role', %s, false)", (role,))
    conn.execute(
        "select set_config('request.jwt.claims', %s, false)",
        (json.dumps({"sub": user_id, "role": role}) if user_id else "",),
    )


def test_migrations_apply_to_empty_database_once(postgres):
    with psycopg.connect(postgres, autocommit=True) as admin:
        admin.execute("drop database if exists migrate_check")
        admin.execute("create database migrate_check")
    url = postgres.replace("/postgres?", "/migrate_check?")
    try:
        first = migrate(url)
        assert first == [p.stem.partition("_")[0] for p in migration_files()]
        assert migrate(url) == []
    finally:
        with psycopg.connect(postgres, autocommit=True) as admin:
            admin.execute("drop database migrate_check with (force)")


def test_restart_takes_no_table_lock_on_a_live_database(postgres):
    """已是最新的数据库上再次启动，不对表加锁（否则会与正在写入的服务死锁）"""
    with psycopg.connect(postgres) as busy:
        busy.execute("lock table public.tasks, realtime_local.changes, public.credit_packages in row exclusive mode")
        assert migrate(postgres + "&options=-c%20lock_timeout%3D2000", signup_credits=100) == []


def test_changed_sql_files_are_applied_again(postgres, db_conn):
    db_conn.execute("drop trigger realtime_local_capture on public.tasks")
    db_conn.execute("update spool_local.state set value = 'stale' where key = 'sql_fingerprint'")
    migrate(postgres)
    triggers = db_conn.execute(
        "select count(*) as n from pg_trigger"
        " where tgname = 'realtime_local_capture' and tgrelid = 'public.tasks'::regclass"
    ).fetchone()
    assert triggers["n"] == 1


def test_every_public_table_has_row_level_security(db_conn):
    rows = db_conn.execute(
        "select c.relname, c.relrowsecurity from pg_class c join pg_namespace n on n.oid = c.relnamespace"
        " where n.nspname = 'public' and c.relkind = 'r'"
    ).fetchall()
    tables = {r["relname"]: r["relrowsecurity"] for r in rows}
    assert PUBLIC_TABLES <= set(tables)
    assert all(tables.values()), [t for t, on in tables.items() if not on]


def test_clients_hold_no_table_privilege_that_rls_does_not_cover(postgres, db_conn):
    rows = db_conn.execute(
        "select table_name, grantee, privilege_type from information_schema.role_table_grants"
        " where table_schema = 'public' and grantee in ('anon', 'authenticated')"
        " and privilege_type in ('TRUNCATE', 'TRIGGER', 'REFERENCES')"
    ).fetchall()
    assert rows == []
    with psycopg.connect(postgres, autocommit=True) as conn:
        as_role(conn, "authenticated", new_user(conn))
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("truncate public.credit_ledger")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):  # would stall every money function
            with conn.transaction():
                conn.execute("lock table public.credit_ledger in access exclusive mode")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):  # would make every charge a duplicate key
            conn.execute("select setval('public.credit_ledger_id_seq', 1)")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):  # counts every ledger entry: business volume
            conn.execute("select last_value from public.credit_ledger_id_seq")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):  # would stall every signup
            with conn.transaction():
                conn.execute("lock table public.profiles in access exclusive mode")
    with psycopg.connect(postgres, autocommit=True) as conn:
        as_role(conn, "anon")
        for table in ("profiles", "projects"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                with conn.transaction():
                    conn.execute(f"lock table public.{table} in access exclusive mode")


def test_clients_hold_only_the_table_privileges_they_use(postgres, db_conn):
    """anon reads nothing (a grant alone would let it hear Realtime changes); authenticated reads under RLS and
    writes its projects only: any other write privilege would also let it LOCK the table and stall the server."""
    rows = db_conn.execute(
        "select c.relname as table_name, r.role, p.privilege from pg_class c"
        " join pg_namespace n on n.oid = c.relnamespace,"
        " unnest(array['anon', 'authenticated']) r(role),"
        " unnest(array['SELECT', 'INSERT', 'UPDATE', 'DELETE']) p(privilege)"
        " where n.nspname = 'public' and c.relkind in ('r', 'p', 'v', 'm')"
        " and has_table_privilege(r.role, c.oid, p.privilege)"
    ).fetchall()
    granted = {(r["table_name"], r["role"], r["privilege"]) for r in rows}
    assert not {g for g in granted if g[1] == "anon"}
    writes = {(table, privilege) for table, role, privilege in granted if privilege != "SELECT"}
    assert writes == {("projects", "DELETE")}  # and INSERT, UPDATE of its name and description only
    assert ("departed_users", "authenticated", "SELECT") not in granted
    with psycopg.connect(postgres, autocommit=True) as conn:
        for role in ("anon", "authenticated"):
            as_role(conn, role, new_user(conn) if role == "authenticated" else None)
            with pytest.raises(psycopg.errors.InsufficientPrivilege):  # would stall every signup and deletion
                with conn.transaction():
                    conn.execute("lock table public.departed_users in access exclusive mode")
            conn.execute("reset role")


def test_signup_grants_credits_once(db_conn):
    user = new_user(db_conn)
    again = db_conn.execute(
        "select * from public.grant_credits(%s, 100, 'grant', %s)", (user, f"signup:{user}")
    ).fetchone()
    assert again["applied"] is False
    account = db_conn.execute("select balance from public.credit_accounts where user_id = %s", (user,)).fetchone()
    ledger = db_conn.execute(
        "select sum(delta) as total, count(*) as n from public.credit_ledger where user_id = %s", (user,)
    ).fetchone()
    assert account["balance"] == 100 == ledger["total"] and ledger["n"] == 1
    assert db_conn.execute("select email from public.profiles where id = %s", (user,)).fetchone()


def test_anonymous_users_get_signup_credits_once_their_account_is_permanent(db_conn):
    user = str(uuid.uuid4())
    db_conn.execute("insert into auth.users (id, is_anonymous) values (%s, true)", (user,))
    balance = "select balance from public.credit_accounts where user_id = %s"
    assert db_conn.execute(balance, (user,)).fetchone()["balance"] == 0
    for _ in range(2):  # linking an email makes it permanent; later updates grant nothing more
        db_conn.execute(
            "update auth.users set is_anonymous = false, email = %s where id = %s", (f"{user}@example.com", user)
        )
    assert db_conn.execute(balance, (user,)).fetchone()["balance"] == 100
    profile = db_conn.execute("select email from public.profiles where id = %s", (user,)).fetchone()
    assert profile["email"] == f"{user}@example.com"


def test_seed_sets_stripe_price_ids_and_never_wipes_one_set_by_hand(db_conn):
    from lib.local.migrate import SEED

    seed = SEED.read_text()
    with db_conn.transaction(force_rollback=True):
        db_conn.execute("update public.credit_packages set stripe_price_id = 'price_by_hand' where id = 'creator'")
        db_conn.execute(seed.replace("500, 500, 'usd', null", "500, 500, 'usd', 'price_starter'"))
        rows = db_conn.execute("select id, stripe_price_id from public.credit_packages").fetchall()
        ids = {row["id"]: row["stripe_price_id"] for row in rows}
        assert ids["starter"] == "price_starter"  # an id written into the seed reaches a seeded database
        assert ids["creator"] == "price_by_hand"  # the seed's null does not wipe the one set in the dashboard


def _seed_rows_of(conn, owner: str) -> None:
    project = conn.execute(
        "insert into public.projects (user_id, name) values (%s, 'A') returning id", (owner,)
    ).fetchone()["id"]
    asset = conn.execute(
        "insert into public.assets (user_id, project_id, kind, bucket, path, status)"
        " values (%s, %s, 'image', 'media', %s, 'ready') returning id",
        (owner, project, f"{owner}/a.png"),
    ).fetchone()["id"]
    conn.execute(
        "select public.create_task(%s, 'image.upscale', '{}'::jsonb, 5, 'k', %s, %s::uuid[], null)",
        (owner, project, [asset]),
    )
    conn.execute(
        "insert into public.purchases (user_id, package_id, credits, amount_cents, currency)"
        " values (%s, 'starter', 500, 500, 'usd')",
        (owner,),
    )
    conn.execute(
        "insert into public.stripe_events (id, type) values (%s, 'checkout.session.completed')", (f"evt_{owner}",)
    )


OWNED = {
    "profiles": "id",
    "credit_accounts": "user_id",
    "credit_ledger": "user_id",
    "projects": "user_id",
    "assets": "user_id",
    "tasks": "user_id",
    "purchases": "user_id",
}


def test_rls_hides_and_protects_other_users_rows(postgres):
    with psycopg.connect(postgres, autocommit=True, row_factory=dict_row) as conn:
        alice, bob = new_user(conn), new_user(conn)
        _seed_rows_of(conn, alice)
        as_role(conn, "authenticated", bob)
        for table, column in OWNED.items():
            seen = conn.execute(f"select count(*) as n from public.{table} where {column} = %s", (alice,))
            assert seen.fetchone()["n"] == 0, table
            updated = _try(conn, f"update public.{table} set {column} = {column} where {column} = %s", (alice,))
            assert updated in (0, None), table
            deleted = _try(conn, f"delete from public.{table} where {column} = %s", (alice,))
            assert deleted in (0, None), table
        # Server only, even for the owner.
        for table in ("stripe_events", "app_settings", "task_job_states", "task_output_sweeps"):
            assert _try(conn, f"select * from public.{table}") is None, table
        # Writes of one's own money rows are refused too.
        assert _try(conn, "update public.credit_accounts set balance = 1000000") in (0, None)
        assert (
            _try(
                conn,
                "insert into public.credit_ledger (user_id, delta, kind, balance_after)"
                " values (%s, 1000, 'grant', 1000)",
                (bob,),
            )
            is None
        )
        assert _try(conn, "insert into public.tasks (user_id, model_key) values (%s, 'x')", (bob,)) is None
        assert _try(conn, "insert into public.projects (user_id, name) values (%s, 'x')", (alice,)) is None
        # ...while one's own rows are visible.
        assert conn.execute("select balance from public.credit_accounts").fetchone()["balance"] == 100
        as_role(conn, "postgres")


def test_the_display_name_a_user_writes_directly_is_bounded(postgres):
    """资料里唯一由客户端直接写的列（经 Data API）：有长度上限，像项目名一样"""
    with psycopg.connect(postgres, autocommit=True) as conn:
        user = new_user(conn)
        as_role(conn, "authenticated", user)
        assert conn.execute("update public.profiles set display_name = 'Ada' where id = %s", (user,)).rowcount == 1
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute("update public.profiles set display_name = repeat('x', 201) where id = %s", (user,))


def test_a_user_writes_only_a_projects_name_and_description(postgres):
    """项目的 id、属主、时间由服务器定：客户端（经 Data API）只能写名字与描述"""
    with psycopg.connect(postgres, autocommit=True) as conn:
        user = new_user(conn)
        as_role(conn, "authenticated", user)
        project = conn.execute(
            "insert into public.projects (user_id, name, description) values (%s, 'A', 'b') returning id", (user,)
        ).fetchone()[0]
        assert _try(conn, "update public.projects set name = 'B', description = null where id = %s", (project,)) == 1
        for column, value in (("id", "gen_random_uuid()"), ("created_at", "now() - interval '9 years'")):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(f"update public.projects set {column} = {value} where id = %s", (project,))
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(
                "insert into public.projects (id, user_id, name, created_at) values (%s, %s, 'C', now())",
                (str(uuid.uuid4()), user),
            )


def _try(conn, sql, params=None):
    """执行一条语句：返回受影响行数，被拒绝时返回 None"""
    try:
        with conn.transaction():
            return conn.execute(sql, params).rowcount
    except psycopg.errors.InsufficientPrivilege:
        return None
    except psycopg.errors.Error:
        return None


@pytest.mark.parametrize("role", ["anon", "authenticated"])
@pytest.mark.parametrize("function", SERVICE_FUNCTIONS)
def test_money_and_task_functions_are_service_role_only(db_conn, role, function):
    assert (
        db_conn.execute(
            "select has_function_privilege(%s, %s, 'execute') as ok", (role, f"public.{function}")
        ).fetchone()["ok"]
        is False
    )
    assert (
        db_conn.execute(
            "select has_function_privilege('service_role', %s, 'execute') as ok", (f"public.{function}",)
        ).fetchone()["ok"]
        is True
    )


def test_authenticated_cannot_call_create_task(postgres):
    with psycopg.connect(postgres, autocommit=True) as conn:
        user = new_user(conn)
        as_role(conn, "authenticated", user)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("select public.create_task(%s, 'image.upscale', '{}'::jsonb, 0)", (user,))


def test_no_function_in_public_is_callable_by_clients(db_conn):
    """Postgres grants EXECUTE to PUBLIC on every new function, and Supabase to anon and authenticated: each migration
    revokes them, and this catches the one that forgets (clients read tables under RLS; they call no function)."""
    rows = db_conn.execute(
        "select p.oid::regprocedure::text as fn, r.role from pg_proc p"
        " join pg_namespace n on n.oid = p.pronamespace, unnest(array['anon', 'authenticated']) r(role)"
        " where n.nspname = 'public' and p.prokind = 'f' and has_function_privilege(r.role, p.oid, 'execute')"
    ).fetchall()
    assert rows == []


def test_security_definer_functions_pin_search_path(db_conn):
    rows = db_conn.execute(
        "select p.proname, p.proconfig from pg_proc p join pg_namespace n on n.oid = p.pronamespace"
        " where n.nspname = 'public' and p.prosecdef"
    ).fetchall()
    assert rows
    for row in rows:  # empty, not just set: a schema on the path lets whoever can create in it shadow a name
        assert 'search_path=""' in (row["proconfig"] or []), row["proname"]


def test_realtime_publication_and_replica_identity(db_conn):
    published = {
        r["tablename"]
        for r in db_conn.execute("select tablename from pg_publication_tables where pubname = 'supabase_realtime'")
    }
    assert {"tasks", "credit_accounts"} <= published
    events = db_conn.execute(
        "select pubinsert, pubupdate, pubdelete, pubtruncate from pg_publication where pubname = 'supabase_realtime'"
    ).fetchone()
    assert events == {"pubinsert": True, "pubupdate": True, "pubdelete": False, "pubtruncate": False}
    identity = db_conn.execute("select relreplident from pg_class where oid = 'public.tasks'::regclass").fetchone()
    assert identity["relreplident"] == "f"


def test_tables_and_functions_to_come_are_not_granted_to_clients(postgres, db_conn):
    """以后迁移新建的表、视图、序列、函数默认不授予 anon、authenticated 与 PUBLIC（本地 shim 重新应用后也是）"""
    db_conn.execute("update spool_local.state set value = 'stale' where key = 'sql_fingerprint'")
    migrate(postgres)  # the shim again, as when any SQL file changes
    with db_conn.transaction(force_rollback=True):
        db_conn.execute(
            "create table public.future_table (id int); create view public.future_view as select 1 as x;"
            " create sequence public.future_seq;"
            " create function public.future_function() returns int language sql as 'select 1';"
            " create function public.future_definer() returns int language sql security definer"
            " set search_path = '' as 'select 1'"
        )
        tables = db_conn.execute(
            "select c.relname, r.role, p.privilege from pg_class c,"
            " unnest(array['anon', 'authenticated', 'public']) r(role),"
            " unnest(array['SELECT', 'INSERT', 'UPDATE', 'DELETE', 'TRUNCATE', 'REFERENCES', 'TRIGGER']) p(privilege)"
            " where c.oid in ('public.future_table'::regclass, 'public.future_view'::regclass)"
            " and has_table_privilege(r.role, c.oid, p.privilege)"
        ).fetchall()
        assert tables == []
        sequences = db_conn.execute(
            "select r.role from unnest(array['anon', 'authenticated', 'public']) r(role)"
            " where has_sequence_privilege(r.role, 'public.future_seq', 'USAGE, SELECT, UPDATE')"
        ).fetchall()
        assert sequences == []
        functions = db_conn.execute(
            "select p.proname, a.grantee::regrole::text as grantee from pg_proc p,"
            " aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a"
            " where p.proname in ('future_function', 'future_definer') and a.privilege_type = 'EXECUTE'"
            " and (a.grantee = 0 or a.grantee in ('anon'::regrole, 'authenticated'::regrole))"
        ).fetchall()
        assert functions == []


def test_no_function_in_public_is_executable_by_public(db_conn):
    """public 里没有任何函数（触发器函数在内）把 EXECUTE 留给 PUBLIC（anon 与 authenticated 都继承它）"""
    rows = db_conn.execute(
        "select p.oid::regprocedure::text as fn from pg_proc p join pg_namespace n on n.oid = p.pronamespace,"
        " aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a"
        " where n.nspname = 'public' and a.grantee = 0 and a.privilege_type = 'EXECUTE'"
    ).fetchall()
    assert rows == []


CLIENT_COLUMN_WRITES = {
    ("profiles", "display_name", "UPDATE"),
    ("projects", "user_id", "INSERT"),
    ("projects", "name", "INSERT"),
    ("projects", "description", "INSERT"),
    ("projects", "name", "UPDATE"),
    ("projects", "description", "UPDATE"),
    ("projects", "updated_at", "UPDATE"),  # stamped with now() by a trigger, whatever is written
}


def test_clients_write_only_the_columns_they_use(db_conn):
    """逐列检查（表级检查看不到列级授权）：anon 不写任何列，authenticated 只写资料的显示名和项目的这几列"""
    rows = db_conn.execute(
        "select c.relname, a.attname, r.role, p.privilege from pg_class c"
        " join pg_namespace n on n.oid = c.relnamespace"
        " join pg_attribute a on a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped,"
        " unnest(array['anon', 'authenticated']) r(role), unnest(array['INSERT', 'UPDATE']) p(privilege)"
        " where n.nspname = 'public' and c.relkind in ('r', 'p', 'v', 'm', 'f')"
        " and has_column_privilege(r.role, c.oid, a.attnum, p.privilege)"
    ).fetchall()
    assert {(r["relname"], r["attname"], r["privilege"]) for r in rows if r["role"] == "authenticated"} == (
        CLIENT_COLUMN_WRITES
    )
    assert [r for r in rows if r["role"] == "anon"] == []


def test_every_text_column_clients_write_is_bounded(db_conn):
    """客户端能写的每个变长列（文本、JSON、数组……）都有约束限制其大小（否则一次请求可存上 GB）"""
    rows = db_conn.execute(
        "select c.relname, a.attname from pg_class c join pg_namespace n on n.oid = c.relnamespace"
        " join pg_attribute a on a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped"
        " join pg_type t on t.oid = a.atttypid"
        " where n.nspname = 'public' and c.relkind in ('r', 'p')"
        " and t.typlen = -1 and a.atttypmod < 0"  # of variable size, no declared length
        " and (has_column_privilege('authenticated', c.oid, a.attnum, 'INSERT')"
        "   or has_column_privilege('authenticated', c.oid, a.attnum, 'UPDATE'))"
        " and not exists (select 1 from pg_constraint k where k.conrelid = c.oid and k.contype = 'c'"
        "   and a.attnum = any (k.conkey))"
    ).fetchall()
    assert rows == []


def test_views_clients_read_check_the_readers_rows(db_conn):
    """客户端能读的视图都以读者身份执行（security_invoker，RLS 生效）；物化视图没有 RLS，客户端一个也读不到"""
    rows = db_conn.execute(
        "select c.relname, c.relkind, c.reloptions from pg_class c join pg_namespace n on n.oid = c.relnamespace,"
        " unnest(array['anon', 'authenticated']) r(role)"
        " where n.nspname = 'public' and c.relkind in ('v', 'm') and has_table_privilege(r.role, c.oid, 'SELECT')"
        " and (c.relkind = 'm' or not coalesce('security_invoker=true' = any (c.reloptions), false))"
    ).fetchall()
    assert rows == []


def test_no_table_shows_or_hands_over_another_users_rows(postgres):
    """逐表遍历（以后的表也算）：以另一用户身份读、逐列改、删，都碰不到别人的行"""
    with psycopg.connect(postgres, autocommit=True, row_factory=dict_row) as conn:
        alice, bob = new_user(conn), new_user(conn)
        _seed_rows_of(conn, alice)
        tables = [
            r["relname"]
            for r in conn.execute(
                "select c.relname from pg_class c join pg_namespace n on n.oid = c.relnamespace"
                " where n.nspname = 'public' and c.relkind in ('r', 'p', 'v', 'm', 'f') order by 1"
            )
        ]
        columns = {
            t: [
                r["attname"]
                for r in conn.execute(
                    "select attname from pg_attribute where attrelid = %s::regclass and attnum > 0"
                    " and not attisdropped and attgenerated = '' and attidentity = ''",
                    (f"public.{t}",),
                )
            ]
            for t in tables
        }
        for role, user in (("anon", None), ("authenticated", bob)):
            as_role(conn, role, user)
            for table in tables:
                statements = [f"select to_jsonb(t)::text as row from public.{table} t"]
                statements += [
                    f'update public.{table} t set "{c}" = "{c}" returning to_jsonb(t)::text as row'
                    for c in columns[table]
                ]
                statements.append(f"delete from public.{table} t returning to_jsonb(t)::text as row")
                for statement in statements:
                    try:
                        with conn.transaction(force_rollback=True):
                            rows = conn.execute(statement).fetchall()
                    except psycopg.errors.InsufficientPrivilege:
                        continue
                    assert not [r for r in rows if alice in r["row"]], (role, statement)
            as_role(conn, "postgres")


def test_a_projects_update_time_is_the_servers_and_its_name_never_blank(postgres):
    """经 Data API 写项目：updated_at 总是服务器的 now()，空白名字被拒（API 去掉首尾空白后要求至少一个字符）"""
    with psycopg.connect(postgres, autocommit=True) as conn:
        user = new_user(conn)
        as_role(conn, "authenticated", user)
        project = conn.execute(
            "insert into public.projects (user_id, name) values (%s, 'A') returning id", (user,)
        ).fetchone()[0]
        stamped = conn.execute(
            "update public.projects set name = 'B', updated_at = '2001-01-01' where id = %s"
            " returning updated_at > now() - interval '1 minute'",
            (project,),
        ).fetchone()[0]
        assert stamped
        for name in ("   ", "\t\n"):
            with pytest.raises(psycopg.errors.CheckViolation):
                conn.execute("insert into public.projects (user_id, name) values (%s, %s)", (user, name))
            with pytest.raises(psycopg.errors.CheckViolation):
                conn.execute("update public.projects set name = %s where id = %s", (name, project))
        conn.execute("reset role")


def test_a_project_named_blank_before_the_check_is_renamed_and_can_be_changed(postgres, monkeypatch):
    """检查之前存下的空白名字的项目：迁移给它起名，之后改描述不再被检查拒绝"""
    from lib.local import migrate as migrate_module

    files = migration_files()
    before = [p for p in files if p.name < "20261205003000"]
    with psycopg.connect(postgres, autocommit=True) as admin:
        admin.execute("drop database if exists blank_names_check")
        admin.execute("create database blank_names_check")
    url = postgres.replace("/postgres?", "/blank_names_check?")
    try:
        monkeypatch.setattr(migrate_module, "migration_files", lambda: before)
        migrate(url)
        with psycopg.connect(url, autocommit=True) as conn:
            user = new_user(conn)
            project = conn.execute(
                "insert into public.projects (user_id, name) values (%s, ' \t ') returning id", (user,)
            ).fetchone()[0]
        monkeypatch.setattr(migrate_module, "migration_files", lambda: files)
        migrate(url)
        with psycopg.connect(url, autocommit=True) as conn:
            as_role(conn, "authenticated", user)
            name = conn.execute(
                "update public.projects set description = 'kept' where id = %s returning name", (project,)
            ).fetchone()[0]
            conn.execute("reset role")
            validated = conn.execute(
                "select convalidated from pg_constraint where conname = 'projects_name_not_blank'"
            ).fetchone()[0]
        assert name == "Untitled" and validated
    finally:
        with psycopg.connect(postgres, autocommit=True) as admin:
            admin.execute("drop database blank_names_check with (force)")


# Schemas the Data API serves (supabase/config.toml [api] schemas) and Realtime publishes from.
CLIENT_SCHEMAS = ("public",)
OWNER_CHECK = "(( SELECT auth.uid() AS uid) = {column})"
# Policies that are not an owner check, each on purpose: the credit packs are one catalog for every signed-in user.
SHARED_POLICIES = {("credit_packages", "SELECT", "active", None)}


def test_every_table_clients_reach_has_row_level_security_its_owner_cannot_skip(db_conn):
    """逐表遍历（分区表、以后的表在内）：客户端可达的 schema 里每张表都开着 RLS，且表的属主不是客户端角色"""
    rows = db_conn.execute(
        "select n.nspname, c.relname, c.relrowsecurity,"
        " pg_has_role('anon', c.relowner, 'USAGE') or pg_has_role('authenticated', c.relowner, 'USAGE') as owned"
        " from pg_class c join pg_namespace n on n.oid = c.relnamespace"
        " where n.nspname = any(%s) and c.relkind in ('r', 'p')",
        (list(CLIENT_SCHEMAS),),
    ).fetchall()
    assert PUBLIC_TABLES <= {r["relname"] for r in rows}
    assert [r for r in rows if not r["relrowsecurity"] or r["owned"]] == []


def test_every_policy_is_for_signed_in_users_and_checks_the_owner(db_conn):
    """逐条遍历策略：只给 authenticated（不给 anon、PUBLIC），条件都是 auth.uid() = 属主列（共享的套餐目录除外）"""
    rows = db_conn.execute(
        "select tablename, policyname, roles::text[] as roles, cmd, qual, with_check from pg_policies"
        " where schemaname = any(%s)",
        (list(CLIENT_SCHEMAS),),
    ).fetchall()
    assert rows
    for row in rows:
        assert row["roles"] == ["authenticated"], row
        if (row["tablename"], row["cmd"], row["qual"], row["with_check"]) in SHARED_POLICIES:
            continue
        owner = OWNER_CHECK.format(column=OWNED.get(row["tablename"], "?"))
        assert row["qual"] in (owner, None) and row["with_check"] in (owner, None), row
        assert (row["qual"], row["with_check"]) != (None, None), row


def test_what_realtime_publishes_is_read_under_rls(db_conn):
    """Realtime 发布的每张表都开着 RLS、anon 读不到，authenticated 能读到的只有自己的行（由上面的策略检查保证）"""
    rows = db_conn.execute(
        "select p.schemaname, p.tablename, c.relrowsecurity,"
        " has_table_privilege('anon', c.oid, 'SELECT') as anon_reads,"
        " exists (select 1 from pg_policies q where q.schemaname = p.schemaname and q.tablename = p.tablename"
        "   and q.cmd in ('SELECT', 'ALL')) as has_read_policy"
        " from pg_publication_tables p join pg_class c on c.oid = format('%I.%I', p.schemaname, p.tablename)::regclass"
        " where p.pubname = 'supabase_realtime'"
    ).fetchall()
    assert {r["tablename"] for r in rows} == {"tasks", "credit_accounts"}
    for row in rows:
        assert row["relrowsecurity"] and not row["anon_reads"] and row["has_read_policy"], row


def test_security_definer_functions_in_every_schema_pin_search_path(db_conn):
    """不止 public：任何 schema 里的 security definer 函数都把 search_path 设为空"""
    rows = db_conn.execute(
        "select p.oid::regprocedure::text as fn, p.proconfig from pg_proc p"
        " join pg_namespace n on n.oid = p.pronamespace"
        " where p.prosecdef and n.nspname not in ('pg_catalog', 'information_schema')"
    ).fetchall()
    assert [r["fn"] for r in rows if 'search_path=""' not in (r["proconfig"] or [])] == []


def test_the_media_bucket_is_private_and_storage_has_no_client_policy(db_conn):
    """media 桶是私有的（下载只走签名 URL）；迁移没给 storage 里的表加任何策略（只有服务密钥能读写对象）"""
    bucket = db_conn.execute("select public from storage.buckets where id = 'media'").fetchone()
    assert bucket == {"public": False}
    assert db_conn.execute("select * from pg_policies where schemaname = 'storage'").fetchall() == []
