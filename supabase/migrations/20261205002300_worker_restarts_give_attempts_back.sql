-- A local worker that is stopped on purpose (Ctrl-C, SIGTERM: a restart, a deploy) hands the task it was running
-- back to the queue. That claim used up an attempt although nothing had failed, so a task whose worker restarted
-- TASK_MAX_ATTEMPTS + 1 times failed with "A temporary problem stopped the job N times".
--
-- release_task gives the attempt back: the claim is counted in released_attempts, and the attempt limit (requeue,
-- reaper, Modal's reclaim) counts attempts - released_attempts. attempts itself keeps numbering the claims: an
-- attempt's writes and its upload prefix ({user}/tasks/{task}/{attempt}/) are its own, so a number is never
-- reused by the next claim while the stopped attempt may still be winding down.

alter table public.tasks add column released_attempts int not null default 0;
comment on column public.tasks.released_attempts is
  'Claims given back by a worker stopped on purpose (a restart); they do not count toward the attempt limit.';

create function public.release_task(p_task_id uuid, p_attempt int, p_message text)
returns text
language plpgsql security definer set search_path = ''
as $$
declare
  v_status text;
begin
  update public.tasks set status = 'queued', released_attempts = released_attempts + 1, message = p_message,
    call_id = null, queued_at = now(), updated_at = now()
  where id = p_task_id and status = 'processing' and attempts = p_attempt
  returning status into v_status;
  if found then
    return v_status;
  end if;
  select t.status into v_status from public.tasks t where t.id = p_task_id;
  return coalesce(v_status, 'missing');
end;
$$;
revoke execute on function public.release_task(uuid, int, text) from public, anon, authenticated;
grant execute on function public.release_task(uuid, int, text) to service_role;

create or replace function public.requeue_task(p_task_id uuid, p_attempt int, p_max_attempts int, p_message text)
returns text
language plpgsql security definer set search_path = ''
as $$
declare
  v_task public.tasks;
  v_used int;
  v_msg text;
begin
  select * into v_task from public.tasks t where t.id = p_task_id for update;
  if not found or v_task.status <> 'processing' or v_task.attempts <> p_attempt then
    return coalesce(v_task.status, 'missing');
  end if;
  v_used := v_task.attempts - v_task.released_attempts;
  if v_used >= p_max_attempts then
    v_msg := 'A temporary problem stopped the job ' || v_used || ' times; your credits were refunded.';
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
    if v_task.attempts - v_task.released_attempts >= p_max_attempts then
      perform public.finish_task(v_task.id, 'failed', null, null,
        jsonb_build_object('code', 'worker_lost',
          'message', 'The job stopped responding too many times and was refunded.'),
        'Failed after ' || (v_task.attempts - v_task.released_attempts) || ' attempts.', null);
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

create or replace function public.reclaim_task(p_task_id uuid, p_call_id text, p_max_attempts int)
returns setof public.tasks
language sql security definer set search_path = ''
as $$
  update public.tasks set
    attempts = attempts + 1, message = 'Resuming after the worker was lost.',
    heartbeat_at = now(), updated_at = now()
  where id = p_task_id and status = 'processing' and call_id = p_call_id
    and attempts - released_attempts < p_max_attempts
  returning *;
$$;
