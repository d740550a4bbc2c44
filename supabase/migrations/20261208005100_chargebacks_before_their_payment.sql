-- A chargeback that arrives before its payment is recorded is kept.
--
-- A dispute names only its PaymentIntent, and a purchase learns its PaymentIntent from checkout.session.completed
-- (or the success page). When that event was still being retried (a webhook down or refused for a while, events
-- resent from the Dashboard in any order), charge.dispute.funds_withdrawn matched nothing and was stored as
-- processed: the grant that followed gave the whole pack for money taken back. The API now reads the purchase id
-- from the PaymentIntent's metadata at Stripe and passes it here; the purchase learns its PaymentIntent, the
-- dispute is recorded on it, and the grant settles it like a refund that came first.

create function public.apply_charge_dispute(p_payment_intent_id text, p_dispute_id text, p_amount_cents bigint,
                                            p_withdrawn boolean, p_purchase_id uuid)
returns jsonb
language plpgsql security definer set search_path = ''
as $$
begin
  if p_purchase_id is not null and p_payment_intent_id is not null
     and not exists (select 1 from public.purchases p where p.payment_intent_id = p_payment_intent_id) then
    update public.purchases p set payment_intent_id = p_payment_intent_id, updated_at = now()
    where p.id = p_purchase_id and p.payment_intent_id is null;
  end if;
  return public.apply_charge_dispute(p_payment_intent_id, p_dispute_id, p_amount_cents, p_withdrawn);
end;
$$;
revoke execute on function public.apply_charge_dispute(text, text, bigint, boolean, uuid)
  from public, anon, authenticated;
grant execute on function public.apply_charge_dispute(text, text, bigint, boolean, uuid) to service_role;
