-- Realtime: browsers subscribe to their own tasks and credit balance.
-- Supabase Realtime checks each change against the subscriber's SELECT
-- policies, so the owner-only policies above decide who receives what.
-- REPLICA IDENTITY FULL sends the old row on UPDATE/DELETE as well.

alter table public.tasks replica identity full;
alter table public.credit_accounts replica identity full;
alter publication supabase_realtime add table public.tasks, public.credit_accounts;

-- The API roles need table privileges for RLS to apply at all; writes stay
-- with the service-role functions.
grant select on public.tasks, public.credit_accounts, public.credit_ledger, public.assets,
  public.purchases, public.profiles, public.credit_packages to authenticated;
grant select, insert, update, delete on public.projects to authenticated;
revoke update on public.profiles from anon, authenticated;
grant update (display_name) on public.profiles to authenticated;
revoke insert, update, delete on public.tasks, public.credit_accounts, public.credit_ledger,
  public.assets, public.purchases, public.credit_packages, public.stripe_events, public.app_settings
  from anon, authenticated;
revoke all on public.stripe_events, public.app_settings from anon, authenticated;
