-- The success page asks Stripe about a pending checkout at most once every few seconds.
--
-- GET /billing/checkout/{session_id} asked Stripe on every request while the purchase was pending. A page that
-- polls it (an asynchronous payment stays pending for days), or one account calling it in a loop, spent the
-- Stripe API's rate limit, which the whole deployment shares: checkouts then failed for everyone. The time of
-- the last question is kept on the purchase; a request within the interval answers from our records.

alter table public.purchases add column stripe_checked_at timestamptz;
comment on column public.purchases.stripe_checked_at is
  'When the success page last asked Stripe about this pending checkout; it asks again only a few seconds later.';
