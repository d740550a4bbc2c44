-- Billing effects of Stripe webhook events, each one SQL call run in the same
-- transaction as the stripe_events row that makes the event apply once.
--
-- Refunds and grants may arrive in either order. A purchase records the
-- cumulative refunded amount (Stripe's charge.amount_refunded); whenever the
-- purchase has been granted, settle_purchase_refunds() takes back the
-- refunded share that is still owed. So a refund that arrives before the
-- payment is recorded first and clawed back right after the grant; a refund
-- after the grant is clawed back at once; a repeated or older refund event
-- owes nothing more. The balance never goes below zero: what could not be taken
-- back is added to clawback_shortfall.

alter table public.purchases
  add column payment_intent_id text unique,
  add column amount_refunded_cents bigint not null default 0 check (amount_refunded_cents >= 0);
comment on column public.purchases.payment_intent_id is
  'Stripe PaymentIntent id (pi_...), known once the session completes or a charge event names it.';
comment on column public.purchases.amount_refunded_cents is
  'Cumulative amount refunded by Stripe (charge.amount_refunded); the share of credits to claw back follows it.';

-- ---------------------------------------------------------------------------
-- purchase_for_event: the purchase an event is about, locked. Found by our
-- purchase id (metadata), else by session or PaymentIntent id; created from the
-- event's metadata when the checkout call never recorded it. Null when the
-- event names nothing we sold. Internal: only the functions below call it.
-- ---------------------------------------------------------------------------
create function public.purchase_for_event(p_purchase_id uuid, p_session_id text, p_payment_intent_id text,
                                          p_user_id uuid, p_package_id text)
returns public.purchases
language plpgsql security definer set search_path = ''
as $$
declare
  v_purchase public.purchases;
begin
  select * into v_purchase from public.purchases p
  where p.id = p_purchase_id or p.checkout_session_id = p_session_id or p.payment_intent_id = p_payment_intent_id
  order by (p.id = p_purchase_id) desc nulls last
  limit 1
  for update;
  if found then
    return v_purchase;
  end if;
  if p_user_id is null or p_package_id is null then
    return null;
  end if;
  insert into public.purchases (id, user_id, package_id, checkout_session_id, payment_intent_id,
                                credits, amount_cents, currency)
  select coalesce(p_purchase_id, gen_random_uuid()), p_user_id, k.id, p_session_id, p_payment_intent_id,
         k.credits, k.price_cents, k.currency
  from public.credit_packages k where k.id = p_package_id
  on conflict do nothing;
  -- A concurrent event may have inserted it first: read (and lock) whichever row won.
  select * into v_purchase from public.purchases p
  where p.id = p_purchase_id or p.checkout_session_id = p_session_id or p.payment_intent_id = p_payment_intent_id
  order by (p.id = p_purchase_id) desc nulls last
  limit 1
  for update;
  return v_purchase;
end;
$$;
revoke execute on function public.purchase_for_event(uuid, text, text, uuid, text) from public, anon, authenticated;

-- ---------------------------------------------------------------------------
-- settle_purchase_refunds: once a purchase is granted, claw back the share of
-- its credits that its refunds still owe (idempotent: it owes nothing twice).
-- Internal: only the functions below call it.
-- ---------------------------------------------------------------------------
create function public.settle_purchase_refunds(p_purchase_id uuid)
returns public.purchases
language plpgsql security definer set search_path = ''
as $$
declare
  v_purchase public.purchases;
  v_target bigint;
  v_owed bigint;
  v_applied boolean;
  v_delta bigint;
begin
  select * into v_purchase from public.purchases p where p.id = p_purchase_id for update;
  if v_purchase.status not in ('paid', 'partially_refunded', 'refunded') then
    return v_purchase;  -- nothing granted yet: the recorded refund is settled after the grant
  end if;
  -- Refunded share of the credits, rounded down (in the buyer's favour); a full refund takes all.
  v_target := case
    when v_purchase.amount_refunded_cents >= v_purchase.amount_cents then v_purchase.credits
    else v_purchase.credits * v_purchase.amount_refunded_cents / v_purchase.amount_cents
  end;
  v_owed := v_target - v_purchase.credits_clawed_back - v_purchase.clawback_shortfall;
  if v_owed > 0 then
    select g.applied, g.delta into v_applied, v_delta
    from public.grant_credits(v_purchase.user_id, -v_owed, 'clawback',
                              coalesce(v_purchase.checkout_session_id, v_purchase.id::text)
                                || ':refund:' || v_purchase.amount_refunded_cents) g;
    if not v_applied then
      raise exception 'clawback % already in the ledger but not on purchase %',
        v_purchase.amount_refunded_cents, v_purchase.id;
    end if;
    v_purchase.credits_clawed_back := v_purchase.credits_clawed_back - v_delta;
    v_purchase.clawback_shortfall := v_purchase.clawback_shortfall + v_owed + v_delta;
  end if;
  update public.purchases p set
    credits_clawed_back = v_purchase.credits_clawed_back,
    clawback_shortfall = v_purchase.clawback_shortfall,
    status = case
      when v_purchase.amount_refunded_cents >= v_purchase.amount_cents then 'refunded'
      when v_purchase.amount_refunded_cents > 0 then 'partially_refunded'
      else 'paid'
    end,
    updated_at = now()
  where p.id = p_purchase_id
  returning * into v_purchase;
  return v_purchase;
end;
$$;
revoke execute on function public.settle_purchase_refunds(uuid) from public, anon, authenticated;

-- ---------------------------------------------------------------------------
-- apply_checkout_paid: a session was paid. Grant the pack's credits once per
-- session (ref = session id), then settle any refund recorded before.
-- ---------------------------------------------------------------------------
create function public.apply_checkout_paid(p_purchase_id uuid, p_session_id text, p_payment_intent_id text,
                                           p_user_id uuid, p_package_id text, p_amount_cents bigint)
returns jsonb
language plpgsql security definer set search_path = ''
as $$
declare
  v_purchase public.purchases;
  v_granted boolean;
begin
  v_purchase := public.purchase_for_event(p_purchase_id, p_session_id, p_payment_intent_id, p_user_id, p_package_id);
  if v_purchase.id is null then
    return jsonb_build_object('result', 'ignored');
  end if;
  update public.purchases p set
    checkout_session_id = coalesce(p.checkout_session_id, p_session_id),
    payment_intent_id = coalesce(p.payment_intent_id, p_payment_intent_id),
    amount_cents = case when p_amount_cents > 0 then p_amount_cents else p.amount_cents end,
    status = case when p.status in ('partially_refunded', 'refunded') then p.status else 'paid' end,
    updated_at = now()
  where p.id = v_purchase.id
  returning * into v_purchase;
  select g.applied into v_granted
  from public.grant_credits(v_purchase.user_id, v_purchase.credits, 'purchase', v_purchase.checkout_session_id) g;
  v_purchase := public.settle_purchase_refunds(v_purchase.id);
  return jsonb_build_object('result', case when v_granted then 'granted' else 'already_granted' end,
                            'purchase_id', v_purchase.id, 'status', v_purchase.status);
end;
$$;
revoke execute on function public.apply_checkout_paid(uuid, text, text, uuid, text, bigint)
  from public, anon, authenticated;
grant execute on function public.apply_checkout_paid(uuid, text, text, uuid, text, bigint) to service_role;

-- ---------------------------------------------------------------------------
-- apply_checkout_unpaid: a session was completed without payment yet (async
-- methods), failed or expired. Records it; only a pending purchase changes.
-- ---------------------------------------------------------------------------
create function public.apply_checkout_unpaid(p_purchase_id uuid, p_session_id text, p_payment_intent_id text,
                                             p_user_id uuid, p_package_id text, p_status text)
returns jsonb
language plpgsql security definer set search_path = ''
as $$
declare
  v_purchase public.purchases;
begin
  if p_status not in ('pending', 'failed', 'expired') then
    raise exception 'apply_checkout_unpaid: bad status %', p_status using errcode = '22023';
  end if;
  v_purchase := public.purchase_for_event(p_purchase_id, p_session_id, p_payment_intent_id, p_user_id, p_package_id);
  if v_purchase.id is null then
    return jsonb_build_object('result', 'ignored');
  end if;
  update public.purchases p set
    checkout_session_id = coalesce(p.checkout_session_id, p_session_id),
    payment_intent_id = coalesce(p.payment_intent_id, p_payment_intent_id),
    status = case when p.status = 'pending' then p_status else p.status end,
    updated_at = now()
  where p.id = v_purchase.id
  returning * into v_purchase;
  return jsonb_build_object('result', 'recorded', 'purchase_id', v_purchase.id, 'status', v_purchase.status);
end;
$$;
revoke execute on function public.apply_checkout_unpaid(uuid, text, text, uuid, text, text)
  from public, anon, authenticated;
grant execute on function public.apply_checkout_unpaid(uuid, text, text, uuid, text, text) to service_role;

-- ---------------------------------------------------------------------------
-- apply_charge_refunded: a charge was (partly) refunded. Records the
-- cumulative refunded amount (never lowered: refund events may come out of
-- order) and claws back what it owes if the purchase was granted.
-- ---------------------------------------------------------------------------
create function public.apply_charge_refunded(p_purchase_id uuid, p_payment_intent_id text, p_user_id uuid,
                                             p_package_id text, p_amount_cents bigint, p_amount_refunded_cents bigint)
returns jsonb
language plpgsql security definer set search_path = ''
as $$
declare
  v_purchase public.purchases;
begin
  v_purchase := public.purchase_for_event(p_purchase_id, null, p_payment_intent_id, p_user_id, p_package_id);
  if v_purchase.id is null then
    return jsonb_build_object('result', 'ignored');
  end if;
  update public.purchases p set
    payment_intent_id = coalesce(p.payment_intent_id, p_payment_intent_id),
    amount_cents = case when p_amount_cents > 0 then p_amount_cents else p.amount_cents end,
    amount_refunded_cents = greatest(p.amount_refunded_cents, p_amount_refunded_cents),
    updated_at = now()
  where p.id = v_purchase.id;
  v_purchase := public.settle_purchase_refunds(v_purchase.id);
  return jsonb_build_object('result', 'recorded', 'purchase_id', v_purchase.id, 'status', v_purchase.status,
                            'credits_clawed_back', v_purchase.credits_clawed_back,
                            'clawback_shortfall', v_purchase.clawback_shortfall);
end;
$$;
revoke execute on function public.apply_charge_refunded(uuid, text, uuid, text, bigint, bigint)
  from public, anon, authenticated;
grant execute on function public.apply_charge_refunded(uuid, text, uuid, text, bigint, bigint) to service_role;
