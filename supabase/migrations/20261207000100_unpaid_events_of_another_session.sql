-- An unpaid event (completed unpaid, async payment failed, expired) of a Checkout Session other than the one recorded
-- for its purchase changes nothing.
--
-- An Idempotency-Key reused after Stripe forgot it makes a second session under the same purchase id; the buyer
-- never gets its URL (the API answers 409), but its expiry a day later marked the purchase `expired` while the buyer
-- was still paying the first session by bank transfer. Paid events keep matching by purchase: money received is
-- always granted.

create or replace function public.apply_checkout_unpaid(p_purchase_id uuid, p_session_id text, p_payment_intent_id text,
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
  if v_purchase.id is null or v_purchase.checkout_session_id <> p_session_id then  -- (a null on either side: recorded)
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
