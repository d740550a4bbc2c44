-- Credits owed back, chargebacks, and events about users deleted since checkout.
--
-- Shortfalls: a refund that finds the credits already spent records a clawback_shortfall on its purchase.
-- Credits that come in later (a failed or canceled task's refund, another purchase, a grant) now pay it off
-- first; before, a user could buy, queue tasks with the credits, have the payment refunded, cancel the tasks and
-- keep both the money and the credits.
--
-- Disputes: a chargeback takes the disputed money back without any charge.refunded event. Its
-- charge.dispute.funds_withdrawn takes back the pack's credits like a refund of the disputed amount; a dispute
-- won (charge.dispute.funds_reinstated) gives back what it took.
--
-- Departed users: an event about a purchase whose user has been deleted tried to insert a purchase row for
-- nobody and failed on the foreign key, a 500 Stripe retried for days. No row is created for a missing user; the
-- API answers such an event 'orphaned' and logs a warning naming the session and PaymentIntent, so a paid one
-- can be refunded by hand.

alter table public.purchases
  add column amount_disputed_cents bigint not null default 0 check (amount_disputed_cents >= 0);
comment on column public.purchases.amount_disputed_cents is
  'Amount a chargeback has withdrawn (charge.dispute.funds_withdrawn); 0 again once the dispute is won.';
alter table public.purchases drop constraint purchases_status_check;
alter table public.purchases add constraint purchases_status_check
  check (status in ('pending', 'paid', 'failed', 'expired', 'refunded', 'partially_refunded', 'disputed'));
create index purchases_shortfall_idx on public.purchases (user_id, created_at) where clawback_shortfall > 0;

-- ---------------------------------------------------------------------------
-- purchase_credits_owed: the credits a granted purchase owes back for the money
-- returned (refunds and withdrawn disputes), rounded down (in the buyer's
-- favour); all of them when all the money went back. Internal.
-- ---------------------------------------------------------------------------
create function public.purchase_credits_owed(p_purchase public.purchases)
returns bigint
language sql immutable set search_path = ''
as $$
  select case
    when p_purchase.amount_refunded_cents + p_purchase.amount_disputed_cents >= p_purchase.amount_cents
      then p_purchase.credits
    else p_purchase.credits * (p_purchase.amount_refunded_cents + p_purchase.amount_disputed_cents)
           / p_purchase.amount_cents
  end;
$$;
revoke execute on function public.purchase_credits_owed(public.purchases) from public, anon, authenticated;

-- ---------------------------------------------------------------------------
-- settle_purchase_refunds: as before, with disputed money counted as returned,
-- and the status 'disputed' while a chargeback holds the money.
-- ---------------------------------------------------------------------------
create or replace function public.settle_purchase_refunds(p_purchase_id uuid)
returns public.purchases
language plpgsql security definer set search_path = ''
as $$
declare
  v_purchase public.purchases;
  v_owed bigint;
  v_applied boolean;
  v_delta bigint;
begin
  select * into v_purchase from public.purchases p where p.id = p_purchase_id for update;
  if v_purchase.status not in ('paid', 'partially_refunded', 'refunded', 'disputed') then
    return v_purchase;  -- nothing granted yet: the recorded refund is settled after the grant
  end if;
  v_owed := public.purchase_credits_owed(v_purchase) - v_purchase.credits_clawed_back - v_purchase.clawback_shortfall;
  if v_owed > 0 then
    select g.applied, g.delta into v_applied, v_delta
    from public.grant_credits(v_purchase.user_id, -v_owed, 'clawback',
                              coalesce(v_purchase.checkout_session_id, v_purchase.id::text)
                                || ':refund:' || v_purchase.amount_refunded_cents
                                || case when v_purchase.amount_disputed_cents > 0
                                     then ':disputed:' || v_purchase.amount_disputed_cents else '' end) g;
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
      when v_purchase.amount_disputed_cents > 0 then 'disputed'
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

-- ---------------------------------------------------------------------------
-- collect_shortfalls: whenever a balance rises, open shortfalls (oldest
-- purchase first) take what they are owed. A purchase row a webhook holds
-- locked is skipped: that webhook settles it against the new balance itself
-- (waiting here could deadlock with it: it locks purchase, then account).
-- ---------------------------------------------------------------------------
create function public.collect_shortfalls()
returns trigger
language plpgsql security definer set search_path = ''
as $$
declare
  v_purchase public.purchases;
  v_delta bigint;
begin
  for v_purchase in
    select * from public.purchases p
    where p.user_id = new.user_id and p.clawback_shortfall > 0
    order by p.created_at
    for update skip locked
  loop
    select g.delta into v_delta
    from public.grant_credits(new.user_id, -v_purchase.clawback_shortfall, 'clawback',
                              coalesce(v_purchase.checkout_session_id, v_purchase.id::text)
                                || ':collected:' || gen_random_uuid()) g;
    exit when v_delta = 0;  -- nothing left to take
    update public.purchases p set
      credits_clawed_back = p.credits_clawed_back - v_delta,
      clawback_shortfall = p.clawback_shortfall + v_delta,
      updated_at = now()
    where p.id = v_purchase.id;
  end loop;
  return null;
end;
$$;
revoke execute on function public.collect_shortfalls() from public, anon, authenticated;

create trigger collect_shortfalls
  after update of balance on public.credit_accounts
  for each row when (new.balance > old.balance)
  execute function public.collect_shortfalls();

-- ---------------------------------------------------------------------------
-- apply_charge_dispute: a chargeback withdrew (p_withdrawn) or gave back the
-- disputed money of a purchase, found by its PaymentIntent. Withdrawn: the
-- credits are clawed back like a refund. Reinstated: what the dispute took is
-- given back once per dispute (an open shortfall is forgiven first).
-- ---------------------------------------------------------------------------
create function public.apply_charge_dispute(p_payment_intent_id text, p_dispute_id text, p_amount_cents bigint,
                                            p_withdrawn boolean)
returns jsonb
language plpgsql security definer set search_path = ''
as $$
declare
  v_purchase public.purchases;
  v_excess bigint;
  v_forgiven bigint;
  v_returned bigint;
  v_applied boolean;
begin
  v_purchase := public.purchase_for_event(null, null, p_payment_intent_id, null, null);
  if v_purchase.id is null then
    return jsonb_build_object('result', 'ignored');
  end if;
  if p_withdrawn then
    update public.purchases p set
      amount_disputed_cents = greatest(p.amount_disputed_cents, coalesce(p_amount_cents, p.amount_cents)),
      updated_at = now()
    where p.id = v_purchase.id;
  else
    update public.purchases p set amount_disputed_cents = 0, updated_at = now()
    where p.id = v_purchase.id
    returning * into v_purchase;
    v_excess := v_purchase.credits_clawed_back + v_purchase.clawback_shortfall
                - public.purchase_credits_owed(v_purchase);
    if v_purchase.status = 'disputed' and v_excess > 0 then
      v_forgiven := least(v_excess, v_purchase.clawback_shortfall);
      v_returned := v_excess - v_forgiven;
      -- The purchase first, then the grant: a shortfall still open would collect the credits given back.
      update public.purchases p set
        clawback_shortfall = p.clawback_shortfall - v_forgiven,
        credits_clawed_back = p.credits_clawed_back - v_returned
      where p.id = v_purchase.id;
      if v_returned > 0 then
        select g.applied into v_applied
        from public.grant_credits(v_purchase.user_id, v_returned, 'adjustment',
                                  coalesce(v_purchase.checkout_session_id, v_purchase.id::text)
                                    || ':dispute-won:' || p_dispute_id) g;
        if not v_applied then
          raise exception 'dispute % already given back but still on purchase %', p_dispute_id, v_purchase.id;
        end if;
      end if;
    end if;
  end if;
  v_purchase := public.settle_purchase_refunds(v_purchase.id);
  return jsonb_build_object('result', 'recorded', 'purchase_id', v_purchase.id, 'status', v_purchase.status,
                            'credits_clawed_back', v_purchase.credits_clawed_back,
                            'clawback_shortfall', v_purchase.clawback_shortfall);
end;
$$;
revoke execute on function public.apply_charge_dispute(text, text, bigint, boolean) from public, anon, authenticated;
grant execute on function public.apply_charge_dispute(text, text, bigint, boolean) to service_role;

-- ---------------------------------------------------------------------------
-- purchase_for_event: as before, but a purchase is never created for a user
-- who no longer exists (null, as for an event about nothing we sold).
-- ---------------------------------------------------------------------------
create or replace function public.purchase_for_event(p_purchase_id uuid, p_session_id text, p_payment_intent_id text,
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
  if p_user_id is null or p_package_id is null
     or not exists (select 1 from auth.users u where u.id = p_user_id) then
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
