-- Client privileges, tightened, and Realtime without deletes.
--
-- Supabase grants anon and authenticated every privilege on each new table. departed_users kept them (RLS hid
-- its rows, but a write privilege also lets a client LOCK the table, stalling every signup and deletion), and
-- anon kept SELECT on the client tables: no policy lets it read a row, yet the grant alone was enough to receive
-- Realtime deletes.
revoke all on public.departed_users from public, anon, authenticated;
revoke all on all tables in schema public from anon;
alter default privileges in schema public revoke all on tables from anon;

-- Deletes are not published. Rows of tasks and credit_accounts go away only with their account, and Realtime
-- cannot check a gone row against RLS: it would send the deletion (and its key) to other subscribers, and match
-- their filters against the old row's values.
alter publication supabase_realtime set (publish = 'insert, update');
