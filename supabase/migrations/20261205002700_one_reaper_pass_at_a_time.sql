-- One reaper pass at a time. Each pass refunds the worn-out tasks it finds in one transaction, locking each task's
-- credit account until it commits; two passes at once (several local workers each run the reaper) skipped each
-- other's tasks but not each other's accounts, so each could hold one user's account while waiting for another's:
-- a deadlock that failed all but one of them, and rolled back everything the others had done.

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
