-- Corrections to the two migrations before this one.
--
-- 1. create_task locks the project before the inputs: deleting a project locks it and then its assets, so the
--    other order could deadlock with it (a 503 where a 404 was meant).
-- 2. settle_purchase_refunds takes back everything a purchase still owes, an open shortfall included. A webhook
--    holding a purchase makes the collect_shortfalls trigger skip it; the webhook's own settle now collects.
--    Clawbacks take a fresh ledger ref each (the purchase row, locked, is what makes them apply once): a ref
--    built from amounts could come round again (a second dispute, a shortfall paid off in parts) and refuse.
-- 3. collect_shortfalls stops when the balance is empty instead of writing a clawback of 0.
-- 4. A dispute's withdrawal that arrives after the dispute was won (a late retry) takes nothing.

alter table public.purchases add column dispute_won_id text;
comment on column public.purchases.dispute_won_id is
  'The dispute (dp_...) whose funds were reinstated: a withdrawal event for it arriving later is ignored.';

create or replace function public.create_task(
  p_user_id uuid,
  p_model_key text,
  p_params jsonb,
  p_cost bigint,
  p_idempotency_key text default null,
  p_project_id uuid default null,
  p_input_asset_ids uuid[] default '{}',
  p_max_active int default null
)
returns jsonb
language plpgsql security definer set search_path = ''
as $$
declare
  v_balance bigint;
  v_task public.tasks;
  v_active int;
begin
  if p_cost < 0 then
    raise exception 'cost must not be negative' using errcode = '22023';
  end if;
  select a.balance into v_balance from public.credit_accounts a where a.user_id = p_user_id for update;
  if not found then
    raise exception 'no credit account for user %', p_user_id using errcode = 'SP404';
  end if;

  if p_idempotency_key is not null then
    select * into v_task from public.tasks t
    where t.user_id = p_user_id and t.idempotency_key = p_idempotency_key;
    if found then
      return jsonb_build_object('created', false, 'task', to_jsonb(v_task));
    end if;
  end if;

  if p_max_active is not null then
    -- upload checks and the user's own tasks are counted apart
    select count(*) into v_active from public.tasks t
    where t.user_id = p_user_id and t.status in ('queued', 'processing')
      and (t.model_key = 'media.probe') = (p_model_key = 'media.probe');
    if v_active >= p_max_active then
      raise exception 'too many active tasks (% of %)', v_active, p_max_active using errcode = 'SP429';
    end if;
  end if;

  -- The task's project and inputs are locked until it is committed: deleting one waits for the task and then
  -- finds it (DELETE /assets/{id} answers 409), or wins and the task is refused here, uncharged. The project
  -- first: deleting a project locks it, then its assets (on delete set null).
  if p_project_id is not null
     and not exists (select 1 from public.projects p where p.id = p_project_id and p.user_id = p_user_id
                     for key share) then
    raise exception 'project % is gone', p_project_id using errcode = 'SPP04';
  end if;
  if (select count(*) from (select 1 from public.assets a
                            where a.id = any(p_input_asset_ids) and a.user_id = p_user_id
                            for share) locked)
     <> (select count(distinct i) from unnest(p_input_asset_ids) i) then
    raise exception 'an input asset of user % is gone', p_user_id using errcode = 'SPA04';
  end if;

  if v_balance < p_cost then
    raise exception 'insufficient credits: balance %, cost %', v_balance, p_cost using errcode = 'SP402';
  end if;

  insert into public.tasks (user_id, project_id, model_key, params, cost, idempotency_key, input_asset_ids)
  values (p_user_id, p_project_id, p_model_key, p_params, p_cost, p_idempotency_key, p_input_asset_ids)
  returning * into v_task;

  if p_cost > 0 then
    insert into public.credit_ledger (user_id, delta, kind, task_id, balance_after)
    values (p_user_id, -p_cost, 'charge', v_task.id, v_balance - p_cost);
    update public.credit_accounts set balance = v_balance - p_cost, updated_at = now()
    where user_id = p_user_id;
  end if;

  return jsonb_build_object('created', true, 'task', to_jsonb(v_task));
end;
$$;

-- ---------------------------------------------------------------------------
-- settle_purchase_refunds: once a purchase is granted, take back what its
-- returned money still owes (new refunds and any shortfall left open), as much
-- as the balance holds; the rest stays the purchase's shortfall.
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
-- collect_shortfalls: as before, stopping once the balance is empty.
-- ---------------------------------------------------------------------------
create or replace function public.collect_shortfalls()
returns trigger
language plpgsql security definer set search_path = ''
as $$
declare
  v_purchase public.purchases;
  v_balance bigint := new.balance;
  v_delta bigint;
begin
  for v_purchase in
    select * from public.purchases p
    where p.user_id = new.user_id and p.clawback_shortfall > 0
    order by p.created_at
    for update skip locked
  loop
    exit when v_balance <= 0;
    select g.delta, g.balance into v_delta, v_balance
    from public.grant_credits(new.user_id, -v_purchase.clawback_shortfall, 'clawback',
                              coalesce(v_purchase.checkout_session_id, v_purchase.id::text)
                                || ':collected:' || gen_random_uuid()) g;
    update public.purchases p set
      credits_clawed_back = p.credits_clawed_back - v_delta,
      clawback_shortfall = p.clawback_shortfall + v_delta,
      updated_at = now()
    where p.id = v_purchase.id;
  end loop;
  return null;
end;
$$;

-- ---------------------------------------------------------------------------
-- apply_charge_dispute: as before; the dispute won is remembered, and a
-- withdrawal of it arriving afterwards changes nothing.
-- ---------------------------------------------------------------------------
create or replace function public.apply_charge_dispute(p_payment_intent_id text, p_dispute_id text,
                                                       p_amount_cents bigint, p_withdrawn boolean)
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
  if p_withdrawn and v_purchase.dispute_won_id is not distinct from p_dispute_id then
    return jsonb_build_object('result', 'already_won', 'purchase_id', v_purchase.id, 'status', v_purchase.status);
  end if;
  if p_withdrawn then
    update public.purchases p set
      amount_disputed_cents = greatest(p.amount_disputed_cents, coalesce(p_amount_cents, p.amount_cents)),
      updated_at = now()
    where p.id = v_purchase.id;
  else
    update public.purchases p set amount_disputed_cents = 0, dispute_won_id = p_dispute_id, updated_at = now()
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
