-- A task's inputs and project are held while it is created.
--
-- DELETE /assets/{id} refuses an asset an unfinished task reads, and a task is created only with ready assets
-- of the user's: two checks in two transactions, so a delete racing POST /tasks could remove the file of a task
-- just charged (it then failed as "input deleted", refunded). A project deleted in that moment failed the
-- insert on its foreign key, a 500. create_task now locks its inputs (FOR SHARE) and its project (FOR KEY
-- SHARE) and refuses, uncharged, when either is gone (SPA04, SPP04); the asset delete locks the row (FOR
-- UPDATE) before it looks for readers.

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

  -- The task's inputs and project are locked until it is committed: deleting one waits for the task and then
  -- finds it (DELETE /assets/{id} answers 409), or wins and the task is refused here, uncharged.
  if (select count(*) from (select 1 from public.assets a
                            where a.id = any(p_input_asset_ids) and a.user_id = p_user_id
                            for share) locked)
     <> (select count(distinct i) from unnest(p_input_asset_ids) i) then
    raise exception 'an input asset of user % is gone', p_user_id using errcode = 'SPA04';
  end if;
  if p_project_id is not null
     and not exists (select 1 from public.projects p where p.id = p_project_id and p.user_id = p_user_id
                     for key share) then
    raise exception 'project % is gone', p_project_id using errcode = 'SPP04';
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
