-- A checkout Stripe completes with nothing to pay is granted, and records that nothing was paid.
--
-- A session completed with payment_status 'no_payment_required' (a 100 % discount, a Price of 0) was taken for an
-- asynchronous payment still on its way and left the purchase pending for ever. The API now settles it as paid, with
-- an amount of 0: apply_checkout_paid records an amount of 0 it is given (before, only a positive one replaced the
-- price recorded at checkout, so the purchase would read as paid in full). A purchase of 0 must not then read as
-- refunded in full: money returned (refunds and withdrawn disputes) of 0 owes no credits and leaves it 'paid'.

create or replace function public.purchase_credits_owed(p_purchase public.purchases)
returns bigint
language sql immutable set search_path = ''
as $$
  select case
    when p_purchase.amount_refunded_cents + p_purchase.amount_disputed_cents = 0 then 0
    when p_purchase.amount_refunded_cents + p_purchase.amount_disputed_cents >= p_purchase.amount_cents
      then p_purchase.credits
    else p_purchase.credits * (p_purchase.amount_refunded_cents + p_purchase.amount_disputed_cents)
           / p_purchase.amount_cents
  end;
$$;

-- ---------------------------------------------------------------------------
-- settle_purchase_refunds: as before; 'refunded' needs some money refunded.
-- ---------------------------------------------------------------------------
create or replace function public.settle_purchase_refunds(p_purchase_id uuid)
returns public.purchases
language plpgsql security definer set search_path = ''
as $$
declare
  v_purchase public.purchases;
  v_owed bigint;
  v_balance bigint;
  v_delta bigint;
begin
  select * into v_purchase from public.purchases p where p.id = p_purchase_id for update;
  if v_purchase.status not in ('paid', 'partially_refunded', 'refunded', 'disputed') then
    return v_purchase;  -- nothing granted yet: the recorded refund is settled after the grant
  end if;
  v_owed := public.purchase_credits_owed(v_purchase) - v_purchase.credits_clawed_back;
  if v_owed > 0 then
    select a.balance into v_balance from public.credit_accounts a where a.user_id = v_purchase.user_id for update;
    if v_balance > 0 then
      select g.delta into v_delta
      from public.grant_credits(v_purchase.user_id, -v_owed, 'clawback',
                                coalesce(v_purchase.checkout_session_id, v_purchase.id::text)
                                  || ':refund:' || gen_random_uuid()) g;
      v_purchase.credits_clawed_back := v_purchase.credits_clawed_back - v_delta;
    end if;
  end if;
  update public.purchases p set
    credits_clawed_back = v_purchase.credits_clawed_back,
    clawback_shortfall = greatest(public.purchase_credits_owed(v_purchase) - v_purchase.credits_clawed_back, 0),
    status = case
      when v_purchase.amount_disputed_cents > 0 then 'disputed'
      when v_purchase.amount_refunded_cents > 0
           and v_purchase.amount_refunded_cents >= v_purchase.amount_cents then 'refunded'
      when v_purchase.amount_refunded_cents > 0 then 'partially_refunded'
      else 'paid'
    end,
    updated_at = now()
  where p.id = p_purchase_id
  returning * into v_purchase;
  return v_purchase;
end;
$$;

-- ---------------------------------------------------------------------------
-- apply_checkout_paid: as before, an amount of 0 recorded too; the former
-- signature keeps recording only a positive one.
-- ---------------------------------------------------------------------------
create or replace function public.apply_checkout_paid(p_purchase_id uuid, p_session_id text, p_payment_intent_id text,
                                                      p_user_id uuid, p_package_id text, p_amount_cents bigint,
                                                      p_currency text)
returns jsonb
language plpgsql security definer set search_path = ''
as $$
declare
  v_purchase public.purchases;
  v_price jsonb;
  v_granted boolean;
begin
  v_purchase := public.purchase_for_event(p_purchase_id, p_session_id, p_payment_intent_id, p_user_id, p_package_id);
  if v_purchase.id is null then
    return jsonb_build_object('result', 'ignored');
  end if;
  v_price := jsonb_build_object('amount_cents', v_purchase.amount_cents, 'currency', v_purchase.currency);
  update public.purchases p set
    checkout_session_id = coalesce(p.checkout_session_id, p_session_id),
    payment_intent_id = coalesce(p.payment_intent_id, p_payment_intent_id),
    amount_cents = case when p_amount_cents >= 0 then p_amount_cents else p.amount_cents end,
    currency = case when p_amount_cents >= 0 and p_currency is not null then p_currency else p.currency end,
    status = case when p.status in ('partially_refunded', 'refunded') then p.status else 'paid' end,
    updated_at = now()
  where p.id = v_purchase.id
  returning * into v_purchase;
  select g.applied into v_granted
  from public.grant_credits(v_purchase.user_id, v_purchase.credits, 'purchase', v_purchase.checkout_session_id) g;
  v_purchase := public.settle_purchase_refunds(v_purchase.id);
  return jsonb_build_object('result', case when v_granted then 'granted' else 'already_granted' end,
                            'purchase_id', v_purchase.id, 'status', v_purchase.status, 'price', v_price);
end;
$$;

create or replace function public.apply_checkout_paid(p_purchase_id uuid, p_session_id text, p_payment_intent_id text,
                                                      p_user_id uuid, p_package_id text, p_amount_cents bigint)
returns jsonb
language sql security definer set search_path = ''
as $$
  select public.apply_checkout_paid(p_purchase_id, p_session_id, p_payment_intent_id, p_user_id, p_package_id,
                                    nullif(p_amount_cents, 0), null);
$$;
