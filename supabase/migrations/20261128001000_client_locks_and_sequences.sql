-- More of Supabase's default grants that row level security does not cover, taken back from the
-- client roles (they only ever reach tables through the Data API and Realtime):
-- * MAINTAIN (Postgres 17+) lets a role LOCK any table: a signed-in SQL session could hold
--   credit_ledger in ACCESS EXCLUSIVE mode and stall every money function.
-- * USAGE/UPDATE on sequences lets it setval() the ledger's id sequence, after which every
--   charge fails on a duplicate key.
do $$
begin
  if current_setting('server_version_num')::int >= 170000 then
    execute 'revoke maintain on all tables in schema public from anon, authenticated';
    execute 'alter default privileges in schema public revoke maintain on tables from anon, authenticated';
  end if;
end;
$$;
revoke usage, update on all sequences in schema public from anon, authenticated;
alter default privileges in schema public revoke usage, update on sequences from anon, authenticated;
