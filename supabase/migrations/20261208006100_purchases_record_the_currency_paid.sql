-- A purchase records the currency of the amount it records.
--
-- A paid session (and a refund's charge) overwrote purchases.amount_cents with what the buyer actually paid, which
-- with Adaptive Pricing, per-currency prices or a stripe_price_id in another currency is in the buyer's currency,
-- while purchases.currency kept the pack's: EUR 4.60 read "460 usd". The API now passes the currency that goes with
-- the amount, and both are written together. The former signatures stay, for API containers of the release before
-- during a deploy: they record the amount as before and leave the currency as it was.

-- ---------------------------------------------------------------------------
-- apply_checkout_paid: as before, recording p_amount_cents (when given) in
-- p_currency (when given).
-- ---------------------------------------------------------------------------
create function public.apply_checkout_paid(p_purchase_id uuid, p_session_id text, p_payment_intent_id text,
                                           p_user_id uuid, p_package_id text, p_amount_cents bigint,
                                           p_currency text)
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
    currency = case when p_amount_cents > 0 and p_currency is not null then p_currency else p.currency end,
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
revoke execute on function public.apply_checkout_paid(uuid, text, text, uuid, text, bigint, text)
  from public, anon, authenticated;
grant execute on function public.apply_checkout_paid(uuid, text, text, uuid, text, bigint, text) to service_role;

create or replace function public.apply_checkout_paid(p_purchase_id uuid, p_session_id text, p_payment_intent_id text,
                                                      p_user_id uuid, p_package_id text, p_amount_cents bigint)
returns jsonb
language sql security definer set search_path = ''
as $$
  select public.apply_checkout_paid(p_purchase_id, p_session_id, p_payment_intent_id, p_user_id, p_package_id,
                                    p_amount_cents, null);
$$;

-- ---------------------------------------------------------------------------
-- apply_charge_refunded: as before, recording the charge's amount (when
-- given) in the charge's currency (when given).
-- ---------------------------------------------------------------------------
create function public.apply_charge_refunded(p_purchase_id uuid, p_payment_intent_id text, p_user_id uuid,
                                             p_package_id text, p_amount_cents bigint, p_amount_refunded_cents bigint,
                                             p_currency text)
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
    currency = case when p_amount_cents > 0 and p_currency is not null then p_currency else p.currency end,
    amount_refunded_cents = greatest(p.amount_refunded_cents, p_amount_refunded_cents),
    updated_at = now()
  where p.id = v_purchase.id;
  v_purchase := public.settle_purchase_refunds(v_purchase.id);
  return jsonb_build_object('result', 'recorded', 'purchase_id', v_purchase.id, 'status', v_purchase.status,
                            'credits_clawed_back', v_purchase.credits_clawed_back,
                            'clawback_shortfall', v_purchase.clawback_shortfall);
end;
$$;
revoke execute on function public.apply_charge_refunded(uuid, text, uuid, text, bigint, bigint, text)
  from public, anon, authenticated;
grant execute on function public.apply_charge_refunded(uuid, text, uuid, text, bigint, bigint, text) to service_role;

create or replace function public.apply_charge_refunded(p_purchase_id uuid, p_payment_intent_id text, p_user_id uuid,
                                                        p_package_id text, p_amount_cents bigint,
                                                        p_amount_refunded_cents bigint)
returns jsonb
language sql security definer set search_path = ''
as $$
  select public.apply_charge_refunded(p_purchase_id, p_payment_intent_id, p_user_id, p_package_id, p_amount_cents,
                                      p_amount_refunded_cents, null);
$$;
