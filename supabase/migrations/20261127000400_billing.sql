-- Billing: credit packs sold through Stripe Checkout, purchases, and the
-- record of processed Stripe webhook events.

alter table public.profiles add column stripe_customer_id text unique;
comment on column public.profiles.stripe_customer_id is 'Stripe Customer id (cus_...), created at first checkout.';

-- ---------------------------------------------------------------------------
-- credit_packages: the catalog of packs (seeded in seed.sql). Anyone signed
-- in reads active packs; the server writes.
-- ---------------------------------------------------------------------------
create table public.credit_packages (
  id text primary key,
  name text not null,
  credits bigint not null check (credits > 0),
  price_cents bigint not null check (price_cents > 0),
  currency text not null default 'usd',
  stripe_price_id text,
  active boolean not null default true
);
alter table public.credit_packages enable row level security;
create policy "credit_packages: signed-in users read active packs" on public.credit_packages
  for select to authenticated using (active);
comment on column public.credit_packages.stripe_price_id is
  'Stripe Price id (price_...); when null, Checkout uses inline price_data from price_cents.';

-- ---------------------------------------------------------------------------
-- purchases: one per Checkout Session. Owner reads; the server writes.
-- ---------------------------------------------------------------------------
create table public.purchases (
  id uuid primary key default gen_random_uuid(),
  user_id uuid not null references auth.users (id) on delete cascade,
  package_id text not null references public.credit_packages (id),
  checkout_session_id text unique,
  credits bigint not null,
  amount_cents bigint not null,
  currency text not null,
  status text not null default 'pending'
    check (status in ('pending', 'paid', 'failed', 'expired', 'refunded', 'partially_refunded')),
  credits_clawed_back bigint not null default 0,
  clawback_shortfall bigint not null default 0,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now()
);
alter table public.purchases enable row level security;
create policy "purchases: owner reads" on public.purchases
  for select to authenticated using ((select auth.uid()) = user_id);
create index purchases_user_created_idx on public.purchases (user_id, created_at desc);
comment on column public.purchases.checkout_session_id is 'Stripe Checkout Session id (cs_...).';
comment on column public.purchases.clawback_shortfall is
  'Refunded credits that could not be taken back because the balance was already spent.';

-- ---------------------------------------------------------------------------
-- stripe_events: every webhook event id processed, so each applies once.
-- Server only: RLS on, no policy.
-- ---------------------------------------------------------------------------
create table public.stripe_events (
  id text primary key,
  type text not null,
  received_at timestamptz not null default now(),
  processed_at timestamptz
);
alter table public.stripe_events enable row level security;
comment on table public.stripe_events is 'Processed Stripe webhook events (evt_...); server only, no policy.';
