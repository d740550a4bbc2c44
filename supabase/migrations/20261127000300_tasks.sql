-- Tasks: one paid unit of media work and its lifecycle.
--   queued -> processing -> completed | failed (refund) | queued (retry)
--   queued | processing -> canceled (refund)
-- Terminal states never change again. Every state change goes through the
-- service-role-only functions below, each one round trip with row locks.

-- ---------------------------------------------------------------------------
-- tasks: owner reads own rows (also through Realtime); only functions write.
-- ---------------------------------------------------------------------------
create table public.tasks (
  id uuid primary key default gen_random_uuid(),
  user_id uuid not null references auth.users (id) on delete cascade,
  project_id uuid references public.projects (id) on delete set null,
  model_key text not null,
  params jsonb not null default '{}'::jsonb,
  status text not null default 'queued'
    check (status in ('queued', 'processing', 'completed', 'failed', 'canceled')),
  progress real not null default 0 check (progress between 0 and 1),
  message text,
  cost bigint not null default 0 check (cost >= 0),
  idempotency_key text,
  input_asset_ids uuid[] not null default '{}',
  result jsonb,
  result_url text,
  error jsonb,
  attempts int not null default 0,
  call_id text,
  state jsonb not null default '{}'::jsonb,
  heartbeat_at timestamptz,
  created_at timestamptz not null default now(),
  started_at timestamptz,
  finished_at timestamptz,
  updated_at timestamptz not null default now(),
  unique (user_id, idempotency_key)
);
alter table public.tasks enable row level security;
create policy "tasks: owner reads" on public.tasks
  for select to authenticated using ((select auth.uid()) = user_id);
create index tasks_user_created_idx on public.tasks (user_id, created_at desc, id desc);
create index tasks_active_idx on public.tasks (status, created_at) where status in ('queued', 'processing');
comment on column public.tasks.call_id is 'The Modal FunctionCall id of the dispatched job (cloud mode).';
comment on column public.tasks.state is 'Durable job state that survives a retry, e.g. an external provider''s job id.';
comment on column public.tasks.attempts is 'Claims so far; a worker''s writes only count while its attempt is current.';

-- Wake local workers when a task becomes queued (NOTIFY is delivered on commit).
create function public.notify_task_queued()
returns trigger
language plpgsql security definer set search_path = ''
as $$
begin
  if new.status = 'queued' and (tg_op = 'INSERT' or old.status is distinct from 'queued') then
    perform pg_notify('spool_task_queued', new.id::text);
  end if;
  return new;
end;
$$;
revoke execute on function public.notify_task_queued() from public, anon, authenticated;
create trigger tasks_notify_queued
  after insert or update of status on public.tasks
  for each row execute function public.notify_task_queued();

-- ---------------------------------------------------------------------------
-- create_task: the one call behind POST /tasks. Idempotent on
-- (user, idempotency_key); locks the credit account so the balance check and
-- the charge cannot race. SQLSTATE SP402 = insufficient credits,
-- SP429 = too many active tasks, SP404 = no credit account.
-- Returns {"created": bool, "task": {...}}.
-- ---------------------------------------------------------------------------
create function public.create_task(
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
    select count(*) into v_active from public.tasks t
    where t.user_id = p_user_id and t.status in ('queued', 'processing');
    if v_active >= p_max_active then
      raise exception 'too many active tasks (% of %)', v_active, p_max_active using errcode = 'SP429';
    end if;
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
revoke execute on function public.create_task(uuid, text, jsonb, bigint, text, uuid, uuid[], int)
  from public, anon, authenticated;
grant execute on function public.create_task(uuid, text, jsonb, bigint, text, uuid, uuid[], int) to service_role;

-- ---------------------------------------------------------------------------
-- finish_task: move a task to a terminal state, only from a non-terminal one.
-- p_attempt (when given) must be the current attempt, so a worker that lost
-- its claim cannot finish a task another worker now runs. failed and canceled
-- refund the charge exactly once. Returns {"changed": bool, "task": {...}}.
-- ---------------------------------------------------------------------------
create function public.finish_task(
  p_task_id uuid,
  p_status text,
  p_result jsonb default null,
  p_result_url text default null,
  p_error jsonb default null,
  p_message text default null,
  p_attempt int default null
)
returns jsonb
language plpgsql security definer set search_path = ''
as $$
declare
  v_task public.tasks;
  v_balance bigint;
begin
  if p_status not in ('completed', 'failed', 'canceled') then
    raise exception 'not a terminal status: %', p_status using errcode = '22023';
  end if;
  select * into v_task from public.tasks t where t.id = p_task_id for update;
  if not found then
    raise exception 'no task %', p_task_id using errcode = 'SP404';
  end if;
  if v_task.status in ('completed', 'failed', 'canceled')
     or (p_attempt is not null and (v_task.attempts <> p_attempt or v_task.status <> 'processing')) then
    return jsonb_build_object('changed', false, 'task', to_jsonb(v_task));
  end if;

  update public.tasks set
    status = p_status,
    progress = case when p_status = 'completed' then 1 else progress end,
    result = coalesce(p_result, result),
    result_url = coalesce(p_result_url, result_url),
    error = p_error,
    message = coalesce(p_message, message),
    finished_at = now(),
    updated_at = now()
  where id = p_task_id
  returning * into v_task;

  if p_status in ('failed', 'canceled') and v_task.cost > 0 then
    select a.balance into v_balance from public.credit_accounts a where a.user_id = v_task.user_id for update;
    insert into public.credit_ledger (user_id, delta, kind, task_id, balance_after)
    values (v_task.user_id, v_task.cost, 'refund', v_task.id, v_balance + v_task.cost)
    on conflict do nothing;
    if found then
      update public.credit_accounts set balance = v_balance + v_task.cost, updated_at = now()
      where user_id = v_task.user_id;
    end if;
  end if;

  return jsonb_build_object('changed', true, 'task', to_jsonb(v_task));
end;
$$;
revoke execute on function public.finish_task(uuid, text, jsonb, text, jsonb, text, int)
  from public, anon, authenticated;
grant execute on function public.finish_task(uuid, text, jsonb, text, jsonb, text, int) to service_role;

-- ---------------------------------------------------------------------------
-- claim_task: queued -> processing for one task (attempts + 1). Returns the
-- task, or nothing when it is not queued (already claimed, canceled, done).
-- claim_next_task: the same for the oldest queued task (local worker).
-- ---------------------------------------------------------------------------
create function public.claim_task(p_task_id uuid)
returns setof public.tasks
language sql security definer set search_path = ''
as $$
  update public.tasks set
    status = 'processing', attempts = attempts + 1, message = null,
    started_at = coalesce(started_at, now()), heartbeat_at = now(), updated_at = now()
  where id = p_task_id and status = 'queued'
  returning *;
$$;

create function public.claim_next_task(p_model_keys text[] default null)
returns setof public.tasks
language sql security definer set search_path = ''
as $$
  update public.tasks set
    status = 'processing', attempts = attempts + 1, message = null,
    started_at = coalesce(started_at, now()), heartbeat_at = now(), updated_at = now()
  where id = (
    select t.id from public.tasks t
    where t.status = 'queued' and (p_model_keys is null or t.model_key = any (p_model_keys))
    order by t.created_at
    for update skip locked
    limit 1
  )
  returning *;
$$;

-- ---------------------------------------------------------------------------
-- report_task_progress: progress + heartbeat while the caller's attempt is
-- current. Returns the task's status (and whether the write counted), so a
-- worker learns of a cancel or a lost claim at its next progress point.
-- ---------------------------------------------------------------------------
create function public.report_task_progress(
  p_task_id uuid, p_attempt int, p_progress real default null, p_message text default null
)
returns table (status text, current boolean)
language plpgsql security definer set search_path = ''
as $$
declare
  v_task public.tasks;
begin
  update public.tasks t set
    progress = greatest(t.progress, least(coalesce(p_progress, t.progress), 1)),
    message = coalesce(p_message, t.message),
    heartbeat_at = now(), updated_at = now()
  where t.id = p_task_id and t.status = 'processing' and t.attempts = p_attempt
  returning * into v_task;
  if found then
    return query select v_task.status, true;
  else
    return query select t.status, false from public.tasks t where t.id = p_task_id;
  end if;
end;
$$;

-- ---------------------------------------------------------------------------
-- requeue_task: processing -> queued after a transient failure, while
-- attempts remain; otherwise failed + refunded. Returns the new status.
-- ---------------------------------------------------------------------------
create function public.requeue_task(p_task_id uuid, p_attempt int, p_max_attempts int, p_message text)
returns text
language plpgsql security definer set search_path = ''
as $$
declare
  v_task public.tasks;
begin
  select * into v_task from public.tasks t where t.id = p_task_id for update;
  if not found or v_task.status <> 'processing' or v_task.attempts <> p_attempt then
    return coalesce(v_task.status, 'missing');
  end if;
  if v_task.attempts >= p_max_attempts then
    perform public.finish_task(p_task_id, 'failed', null, null,
      jsonb_build_object('code', 'attempts_exhausted', 'message', p_message), p_message, null);
    return 'failed';
  end if;
  update public.tasks set status = 'queued', message = p_message, call_id = null, updated_at = now()
  where id = p_task_id;
  return 'queued';
end;
$$;

-- ---------------------------------------------------------------------------
-- reap_tasks: the reaper's pass. Processing tasks whose heartbeat is older
-- than p_stall_seconds are requeued, or failed + refunded once they used
-- p_max_attempts; tasks still queued p_queue_timeout_seconds after they were
-- created (no worker could ever start them) are failed + refunded. Returns the tasks to dispatch again: those requeued, those
-- queued without a dispatched call for p_redispatch_seconds (a failed spawn),
-- and those whose call has not started them in 20 times that (a lost call).
-- ---------------------------------------------------------------------------
create function public.reap_tasks(
  p_stall_seconds int, p_max_attempts int, p_redispatch_seconds int, p_queue_timeout_seconds int default 21600
)
returns table (task_id uuid, model_key text, action text)
language plpgsql security definer set search_path = ''
as $$
declare
  v_task public.tasks;
  v_msg text := 'The worker stopped responding; retrying.';
begin
  for v_task in
    select * from public.tasks t
    where t.status = 'processing' and t.heartbeat_at < now() - make_interval(secs => p_stall_seconds)
    order by t.heartbeat_at
    for update skip locked
  loop
    if v_task.attempts >= p_max_attempts then
      perform public.finish_task(v_task.id, 'failed', null, null,
        jsonb_build_object('code', 'worker_lost',
          'message', 'The job stopped responding too many times and was refunded.'),
        'Failed after ' || v_task.attempts || ' attempts.', null);
      task_id := v_task.id; model_key := v_task.model_key; action := 'failed';
    else
      update public.tasks set status = 'queued', message = v_msg, call_id = null, updated_at = now()
      where id = v_task.id;
      task_id := v_task.id; model_key := v_task.model_key; action := 'requeued';
    end if;
    return next;
  end loop;

  for v_task in
    select * from public.tasks t
    where t.status = 'queued' and t.created_at < now() - make_interval(secs => p_queue_timeout_seconds)
    for update skip locked
  loop
    perform public.finish_task(v_task.id, 'failed', null, null,
      jsonb_build_object('code', 'not_started',
        'message', 'No worker could start this job in time; your credits were refunded.'),
      'Never started.', null);
    task_id := v_task.id; model_key := v_task.model_key; action := 'expired';
    return next;
  end loop;

  return query
    select t.id, t.model_key, 'redispatch'::text from public.tasks t
    where t.status = 'queued'
      and (t.call_id is null and t.updated_at < now() - make_interval(secs => p_redispatch_seconds)
        or t.updated_at < now() - make_interval(secs => p_redispatch_seconds * 20))
    order by t.created_at
    limit 500;
end;
$$;

-- ---------------------------------------------------------------------------
-- Small writes of the dispatcher and the runner (service role only).
-- ---------------------------------------------------------------------------
create function public.set_task_dispatch(p_task_id uuid, p_call_id text, p_message text default null)
returns void
language sql security definer set search_path = ''
as $$
  update public.tasks set call_id = coalesce(p_call_id, call_id), message = coalesce(p_message, message),
    updated_at = now()
  where id = p_task_id and status in ('queued', 'processing');
$$;

create function public.save_task_state(p_task_id uuid, p_attempt int, p_state jsonb)
returns boolean
language sql security definer set search_path = ''
as $$
  with changed as (
    update public.tasks set state = state || p_state, heartbeat_at = now(), updated_at = now()
    where id = p_task_id and status = 'processing' and attempts = p_attempt
    returning 1
  )
  select exists (select 1 from changed);
$$;

do $$
declare
  f text;
begin
  foreach f in array array[
    'public.claim_task(uuid)',
    'public.claim_next_task(text[])',
    'public.report_task_progress(uuid, int, real, text)',
    'public.requeue_task(uuid, int, int, text)',
    'public.reap_tasks(int, int, int, int)',
    'public.set_task_dispatch(uuid, text, text)',
    'public.save_task_state(uuid, int, jsonb)'
  ] loop
    execute format('revoke execute on function %s from public, anon, authenticated', f);
    execute format('grant execute on function %s to service_role', f);
  end loop;
end;
$$;
