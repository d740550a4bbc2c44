-- The reaper requeued a stalled task (or failed it after its last attempt, or failed a task that waited in the queue
-- too long) without stopping the Modal call that held it. A container that is alive but cannot report (a hung
-- handler, a network partition to the database) kept its GPU until the function's Modal timeout, although the attempt
-- check refuses its writes; a call still waiting in Modal's queue for an expired task started a GPU container later
-- only to find its task ended. reap_tasks now returns the call each task had when the pass gave up on it (the
-- requeue clears call_id, so the caller could not read it afterwards), and the reaper cancels those calls.

drop function public.reap_tasks(int, int, int, int);

create function public.reap_tasks(
  p_stall_seconds int, p_max_attempts int, p_redispatch_seconds int, p_queue_timeout_seconds int default 21600
)
returns table (task_id uuid, model_key text, action text, call_id text)
language plpgsql security definer set search_path = ''
as $$
declare
  v_task public.tasks;
  v_msg text := 'The worker stopped responding; retrying.';
begin
  if not pg_try_advisory_xact_lock(hashtext('public.reap_tasks')) then
    return;  -- another pass is at work: this one has nothing to add
  end if;

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
      action := 'failed';
    else
      update public.tasks t set status = 'queued', message = v_msg, call_id = null, queued_at = now(),
        updated_at = now()
      where t.id = v_task.id;
      action := 'requeued';
    end if;
    task_id := v_task.id; model_key := v_task.model_key; call_id := v_task.call_id;
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
    task_id := v_task.id; model_key := v_task.model_key; action := 'expired'; call_id := v_task.call_id;
    return next;
  end loop;

  return query
    select t.id, t.model_key, 'redispatch'::text, null::text from public.tasks t
    where t.status = 'queued'
      and (t.call_id is null and t.updated_at < now() - make_interval(secs => p_redispatch_seconds)
        or t.updated_at < now() - make_interval(secs => p_redispatch_seconds * 20))
      and (t.dispatch_started_at is null
        or t.dispatch_started_at < greatest(t.queued_at, now() - interval '2 minutes'))
    order by t.created_at
    limit 500;
end;
$$;
revoke execute on function public.reap_tasks(int, int, int, int) from public, anon, authenticated;
grant execute on function public.reap_tasks(int, int, int, int) to service_role;
