-- A task's queue timeout counts from when it last entered the queue, not from its creation. Before, the
-- reaper could requeue a stalled task that was created long ago and, in the same pass, expire it as
-- "never started": the retries it still had were lost. And a task that ran out of retries after temporary
-- failures was failed with the message meant for a retry ("...; retrying.").

alter table public.tasks add column queued_at timestamptz not null default now();
update public.tasks set queued_at = created_at where status = 'queued';
comment on column public.tasks.queued_at is 'When the task last entered the queue (created or requeued).';

create or replace function public.requeue_task(p_task_id uuid, p_attempt int, p_max_attempts int, p_message text)
returns text
language plpgsql security definer set search_path = ''
as $$
declare
  v_task public.tasks;
  v_msg text;
begin
  select * into v_task from public.tasks t where t.id = p_task_id for update;
  if not found or v_task.status <> 'processing' or v_task.attempts <> p_attempt then
    return coalesce(v_task.status, 'missing');
  end if;
  if v_task.attempts >= p_max_attempts then
    v_msg := 'A temporary problem stopped the job ' || v_task.attempts || ' times; your credits were refunded.';
    perform public.finish_task(p_task_id, 'failed', null, null,
      jsonb_build_object('code', 'attempts_exhausted', 'message', v_msg), v_msg, null);
    return 'failed';
  end if;
  update public.tasks set status = 'queued', message = p_message, call_id = null, queued_at = now(),
    updated_at = now()
  where id = p_task_id;
  return 'queued';
end;
$$;

create or replace function public.reap_tasks(
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
      update public.tasks set status = 'queued', message = v_msg, call_id = null, queued_at = now(),
        updated_at = now()
      where id = v_task.id;
      task_id := v_task.id; model_key := v_task.model_key; action := 'requeued';
    end if;
    return next;
  end loop;

  -- Queued for longer than the timeout since it last entered the queue: no worker could take it.
  for v_task in
    select * from public.tasks t
    where t.status = 'queued' and t.queued_at < now() - make_interval(secs => p_queue_timeout_seconds)
    for update skip locked
  loop
    perform public.finish_task(v_task.id, 'failed', null, null,
      jsonb_build_object('code', 'not_started',
        'message', 'No worker could start this job in time; your credits were refunded.'),
      case when v_task.attempts = 0 then 'Never started.' else 'Not restarted in time.' end, null);
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
