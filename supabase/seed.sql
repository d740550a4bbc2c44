-- Credit packs offered in Checkout. Set stripe_price_id to your Stripe Price ids
-- (Dashboard → Products), here or on the row; when null, Checkout charges price_cents inline.
-- Running the seed again applies the ids written here and keeps an id set on the row by hand.
insert into public.credit_packages (id, name, credits, price_cents, currency, stripe_price_id, active) values
  ('starter', 'Starter — 500 credits', 500, 500, 'usd', null, true),
  ('creator', 'Creator — 2,200 credits', 2200, 2000, 'usd', null, true),
  ('studio', 'Studio — 6,000 credits', 6000, 5000, 'usd', null, true)
on conflict (id) do update set
  name = excluded.name, credits = excluded.credits, price_cents = excluded.price_cents,
  currency = excluded.currency, active = excluded.active,
  stripe_price_id = coalesce(excluded.stripe_price_id, public.credit_packages.stripe_price_id);
