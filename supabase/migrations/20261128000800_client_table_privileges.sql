-- Clients reach tables through the Data API, which never truncates, but Supabase's default
-- grants still give anon and authenticated TRUNCATE, TRIGGER and REFERENCES on every public
-- table. Row level security does not cover TRUNCATE: a signed-in role that can open a SQL
-- session could empty the ledger for everyone. Take them back, now and for tables to come.
revoke truncate, trigger, references on all tables in schema public from anon, authenticated;
alter default privileges in schema public
  revoke truncate, trigger, references on tables from anon, authenticated;
