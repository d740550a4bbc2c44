-- Tables and functions of migrations to come reach clients only through the grants their own migration spells out.
--
-- Supabase's default privileges give authenticated SELECT, INSERT, UPDATE and DELETE on every new table in public
-- (anon lost its share before), and anon and authenticated EXECUTE on every new function; Postgres itself gives
-- EXECUTE on every new function to PUBLIC, which both roles inherit. Every migration so far took them back right
-- after its create; one that forgot would have put a server-only table in reach of the Data API, or a security
-- definer function up as an RPC (grant_credits, to oneself). Nothing is granted to clients by default now: a table
-- clients read, or a function they call, is granted to them by its own migration. (Sequences were taken back
-- before; repeated here so that this file says it all.)
alter default privileges in schema public revoke all on tables from anon, authenticated;
alter default privileges in schema public revoke all on sequences from anon, authenticated;
alter default privileges in schema public revoke all on functions from anon, authenticated;
-- PUBLIC's EXECUTE is a default of every schema: a schema's own default privileges add to it, never take it away.
alter default privileges revoke execute on functions from public;
