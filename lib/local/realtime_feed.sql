-- Local Realtime change feed (local mode only; NOT a Supabase migration).
-- In the cloud, Supabase Realtime reads the WAL of the tables in publication
-- supabase_realtime. Locally, every table in that publication gets an AFTER ROW
-- trigger that records the change in realtime_local.changes and sends only the
-- change's id on channel spool_realtime, so a row of any size travels (NOTIFY
-- payloads are limited to 8000 bytes). The local server reads the rows by id.
-- Idempotent: lib/local/migrate.py applies it after the migrations on every start.

create schema if not exists realtime_local;
comment on schema realtime_local is 'Local Realtime stand-in: the change feed of the dev server (never in the cloud).';
revoke all on schema realtime_local from public;
grant usage on schema realtime_local to anon, authenticated;

-- ---------------------------------------------------------------------------
-- changes: one row per captured change. Server only (RLS on, no policy);
-- pruned by the local server after a few minutes.
-- ---------------------------------------------------------------------------
create table if not exists realtime_local.changes (
  id bigint generated always as identity primary key,
  schema_name text not null,
  table_name text not null,
  type text not null check (type in ('INSERT', 'UPDATE', 'DELETE')),
  record jsonb,
  old_record jsonb,
  committed_at timestamptz not null default clock_timestamp()
);
alter table realtime_local.changes enable row level security;
revoke all on realtime_local.changes from public, anon, authenticated;
create index if not exists changes_committed_at_idx on realtime_local.changes (committed_at);
comment on table realtime_local.changes is
  'Row changes of the tables in publication supabase_realtime, read by the local Realtime server (server only).';

-- The trigger function: to_jsonb() of the rows, as Supabase Realtime casts WAL values.
create or replace function realtime_local.capture()
returns trigger
language plpgsql security definer set search_path = ''
as $$
declare
  v_id bigint;
begin
  insert into realtime_local.changes (schema_name, table_name, type, record, old_record)
  values (
    tg_table_schema, tg_table_name, tg_op,
    case when tg_op <> 'DELETE' then to_jsonb(new) end,
    case when tg_op <> 'INSERT' then to_jsonb(old) end
  )
  returning id into v_id;
  perform pg_notify('spool_realtime', v_id::text);
  if v_id % 1000 = 0 then  -- the feed prunes too, but only once someone has joined: a curl-only stack would grow
    delete from realtime_local.changes where committed_at < now() - interval '10 minutes';
  end if;
  return null;
end;
$$;
revoke execute on function realtime_local.capture() from public, anon, authenticated;

-- A DELETE (where the publication sends them) goes to every subscriber whose
-- filters match the old row, as in the cloud (Supabase Realtime cannot check
-- RLS on a row that is gone); earlier versions checked the old row against the
-- SELECT policies here.
drop function if exists realtime_local.row_visible(regclass, jsonb);

-- ---------------------------------------------------------------------------
-- The capture trigger on every table of the publication, for the changes it
-- publishes (as logical replication would send them), and off the tables that
-- left it.
-- ---------------------------------------------------------------------------
do $$
declare
  t record;
  v_events text;
begin
  select concat_ws(' or ',
           case when pubinsert then 'insert' end,
           case when pubupdate then 'update' end,
           case when pubdelete then 'delete' end)
    into v_events
    from pg_catalog.pg_publication where pubname = 'supabase_realtime';
  for t in
    select c.oid::regclass as rel from pg_catalog.pg_trigger g join pg_catalog.pg_class c on c.oid = g.tgrelid
    where g.tgname = 'realtime_local_capture'
  loop
    execute format('drop trigger realtime_local_capture on %s', t.rel);
  end loop;
  if coalesce(v_events, '') = '' then
    return;
  end if;
  for t in select p.schemaname, p.tablename from pg_catalog.pg_publication_tables p where p.pubname = 'supabase_realtime'
  loop
    execute format(
      'create trigger realtime_local_capture after %s on %I.%I'
      ' for each row execute function realtime_local.capture()', v_events, t.schemaname, t.tablename);
  end loop;
end;
$$;

-- ---------------------------------------------------------------------------
-- visible_rows: the feed's visibility check for a whole batch, one round trip
-- (as Supabase's realtime.apply_rls, a loop that switches role and claims).
-- p_checks: [{"role", "claims", "rel", "pk": [cols], "keys": [{pk values}]}, ...]
-- Returns, per check number, the keys of the rows the subscriber can SELECT
-- (looked up in the table under its role and claims, so RLS decides).
-- ---------------------------------------------------------------------------
drop function if exists realtime_local.visible_rows(jsonb);  -- its result once named deletes too
create function realtime_local.visible_rows(p_checks jsonb)
returns table (check_no int, item jsonb)
language plpgsql volatile set search_path = ''
as $$
declare
  v_check jsonb;
  v_no int := -1;
  v_rel regclass;
  v_cols text;
  v_xcols text;
begin
  for v_check in select value from jsonb_array_elements(p_checks) loop
    v_no := v_no + 1;
    v_rel := (v_check ->> 'rel')::regclass;
    perform set_config('role', v_check ->> 'role', true),
            set_config('request.jwt.claims', v_check ->> 'claims', true);
    select string_agg(format('t.%I', c), ', '), string_agg(format('x.%I', c), ', ')
      into v_cols, v_xcols
      from jsonb_array_elements_text(v_check -> 'pk') c;
    return query execute format(
      'select %s, to_jsonb(k) from (select %s from %s t where (%s) in'
      ' (select %s from jsonb_populate_recordset(null::%s, $1) x)) k',
      v_no, v_cols, v_rel, v_cols, v_xcols, v_rel)
    using v_check -> 'keys';
    perform set_config('role', 'none', true), set_config('request.jwt.claims', '', true);
  end loop;
end;
$$;
revoke execute on function realtime_local.visible_rows(jsonb) from public, anon, authenticated;
