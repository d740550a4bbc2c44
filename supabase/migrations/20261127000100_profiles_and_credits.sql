-- Profiles, credit accounts and the credit ledger.
-- Money moves only through SQL functions that service_role alone may execute;
-- the ledger is append-only and, for every user, balance = sum(delta).

-- ---------------------------------------------------------------------------
-- app_settings: server-owned knobs the database itself needs (e.g. the signup
-- grant, read by a trigger that runs inside Supabase Auth's own transaction).
-- RLS on, no policy: only the server (service role / table owner) reads it.
-- ---------------------------------------------------------------------------
create table public.app_settings (
  key text primary key,
  value jsonb not null,
  updated_at timestamptz not null default now()
);
alter table public.app_settings enable row level security;
comment on table public.app_settings is
  'Server-only settings read by triggers (RLS on, no policy). signup_credits = credits granted once at signup.';
insert into public.app_settings (key, value) values ('signup_credits', '100');

-- ---------------------------------------------------------------------------
-- profiles: one per auth.users row, created by the signup trigger.
-- Owner reads and updates own display_name; the server writes the rest.
-- ---------------------------------------------------------------------------
create table public.profiles (
  id uuid primary key references auth.users (id) on delete cascade,
  email text,
  display_name text,
  created_at timestamptz not null default now()
);
alter table public.profiles enable row level security;
create policy "profiles: owner reads" on public.profiles
  for select to authenticated using ((select auth.uid()) = id);
create policy "profiles: owner updates" on public.profiles
  for update to authenticated using ((select auth.uid()) = id) with check ((select auth.uid()) = id);

-- ---------------------------------------------------------------------------
-- credit_accounts: one balance per user. Owner reads; only SQL functions write.
-- ---------------------------------------------------------------------------
create table public.credit_accounts (
  user_id uuid primary key references auth.users (id) on delete cascade,
  balance bigint not null default 0 check (balance >= 0),
  updated_at timestamptz not null default now()
);
alter table public.credit_accounts enable row level security;
create policy "credit_accounts: owner reads" on public.credit_accounts
  for select to authenticated using ((select auth.uid()) = user_id);

-- ---------------------------------------------------------------------------
-- credit_ledger: append-only history of every balance change.
-- Owner reads; only SQL functions insert. Uniqueness makes retries harmless:
-- one charge and one refund per task, one entry per (ref, kind).
-- ---------------------------------------------------------------------------
create table public.credit_ledger (
  id bigint generated always as identity primary key,
  user_id uuid not null references auth.users (id) on delete cascade,
  delta bigint not null,
  kind text not null check (kind in ('grant', 'purchase', 'charge', 'refund', 'clawback', 'adjustment')),
  task_id uuid,
  ref text,
  balance_after bigint not null check (balance_after >= 0),
  created_at timestamptz not null default now()
);
alter table public.credit_ledger enable row level security;
create policy "credit_ledger: owner reads" on public.credit_ledger
  for select to authenticated using ((select auth.uid()) = user_id);
create unique index credit_ledger_task_kind_key on public.credit_ledger (task_id, kind)
  where kind in ('charge', 'refund');
create unique index credit_ledger_ref_kind_key on public.credit_ledger (ref, kind) where ref is not null;
create index credit_ledger_user_created_idx on public.credit_ledger (user_id, id desc);
comment on column public.credit_ledger.ref is
  'External reference that makes a grant idempotent: a Stripe Checkout Session id, "signup", a refund id.';

-- ---------------------------------------------------------------------------
-- grant_credits: add (or, for clawback/adjustment, remove) credits once per ref.
-- A negative amount never takes the balance below zero; the applied delta is returned.
-- ---------------------------------------------------------------------------
create function public.grant_credits(p_user_id uuid, p_amount bigint, p_kind text, p_ref text)
returns table (applied boolean, delta bigint, balance bigint)
language plpgsql security definer set search_path = ''
as $$
declare
  v_balance bigint;
  v_delta bigint;
  v_id bigint;
begin
  if p_ref is null then
    raise exception 'grant_credits needs a ref' using errcode = '22004';
  end if;
  select a.balance into v_balance from public.credit_accounts a where a.user_id = p_user_id for update;
  if not found then
    raise exception 'no credit account for user %', p_user_id using errcode = 'SP404';
  end if;
  v_delta := greatest(p_amount, -v_balance);
  insert into public.credit_ledger (user_id, delta, kind, ref, balance_after)
  values (p_user_id, v_delta, p_kind, p_ref, v_balance + v_delta)
  on conflict do nothing
  returning id into v_id;
  if v_id is null then
    return query select false, 0::bigint, v_balance;
    return;
  end if;
  update public.credit_accounts set balance = v_balance + v_delta, updated_at = now()
  where user_id = p_user_id;
  return query select true, v_delta, v_balance + v_delta;
end;
$$;
revoke execute on function public.grant_credits(uuid, bigint, text, text) from public, anon, authenticated;
grant execute on function public.grant_credits(uuid, bigint, text, text) to service_role;

-- ---------------------------------------------------------------------------
-- Signup: every new auth.users row gets a profile, a credit account and the
-- signup grant, exactly once (ref 'signup' is unique per user and kind).
-- ---------------------------------------------------------------------------
create function public.handle_new_user()
returns trigger
language plpgsql security definer set search_path = ''
as $$
declare
  v_credits bigint;
begin
  insert into public.profiles (id, email) values (new.id, new.email) on conflict (id) do nothing;
  insert into public.credit_accounts (user_id) values (new.id) on conflict (user_id) do nothing;
  select (s.value #>> '{}')::bigint into v_credits from public.app_settings s where s.key = 'signup_credits';
  if coalesce(v_credits, 0) > 0 then
    perform public.grant_credits(new.id, v_credits, 'grant', 'signup:' || new.id::text);
  end if;
  return new;
end;
$$;
revoke execute on function public.handle_new_user() from public, anon, authenticated;

create trigger on_auth_user_created
  after insert on auth.users
  for each row execute function public.handle_new_user();
