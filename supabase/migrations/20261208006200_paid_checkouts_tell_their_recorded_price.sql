-- A paid checkout answers the price its purchase recorded before the payment.
--
-- The API warned of a price mismatch by comparing the payment with the pack's current price: after a price change,
-- every checkout still open at the old price logged "check the pack's stripe_price_id", and so did every payment in
-- another currency. The purchase's price at checkout is what to compare with, but the payment overwrites it with the
-- amount paid; apply_checkout_paid now returns it ('price': amount_cents, currency) as it was before.

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
                            'purchase_id', v_purchase.id, 'status', v_purchase.status, 'price', v_price);
end;
$$;
