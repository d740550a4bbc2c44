-- One reaper pass at a time. Each pass refunds the worn-out tasks it finds in one transaction, locking each task's
-- credit account until it commits; two passes at once (several local workers each run the reaper) skipped each
-- other's tasks but not each other's accounts, so each could hold one user's account while waiting for another's:
-- a deadlock that failed all but one of them, and rolled back everything the others had done.
--
-- One dispatcher spawns a task at a time. The reaper picked the tasks to spawn again with a plain select and spawned
-- them after the select had committed, one by one: a second pass (another worker's reaper, a `modal run` beside the
-- schedule) or a pass meeting the API's own slow spawn picked the same tasks and spawned them again. The extra call
-- only exits at its claim, but it started a container for nothing, and its call id could replace the one a cancel
-- had to reach.
--
-- A dispatcher now claims the task right before its spawn (start_task_dispatch: queued, no call, no other dispatch
-- in flight) and set_task_dispatch releases it with the call id or the failure. A claim older than 2 minutes (a
-- spawn gives up after 10 s) or older than the task's last entry into the queue no longer counts: a dispatcher that
-- died mid-spawn holds the task for 2 minutes, not for good. The reaper does not pick a task being dispatched.

alter table public.tasks add column dispatch_started_at timestamptz;
comment on column public.tasks.dispatch_started_at is
  'When a dispatcher claimed the task to spawn its call (null once the spawn is recorded or failed).';

create function public.start_task_dispatch(p_task_id uuid)
returns boolean
language sql security definer set search_path = ''
as $$
  with claimed as (
    update public.tasks set dispatch_started_at = now()
    where id = p_task_id and status = 'queued' and call_id is null
      and (dispatch_started_at is null or dispatch_started_at < greatest(queued_at, now() - interval '2 minutes'))
    returning 1
  )
  select exists (select 1 from claimed);
$$;
revoke execute on function public.start_task_dispatch(uuid) from public, anon, authenticated;
grant execute on function public.start_task_dispatch(uuid) to service_role;

create or replace function public.set_task_dispatch(p_task_id uuid, p_call_id text, p_message text default null)
returns void
language sql security definer set search_path = ''
as $$
  update public.tasks set call_id = coalesce(p_call_id, call_id), message = coalesce(p_message, message),
    dispatch_started_at = null, updated_at = now()
  where id = p_task_id and status = 'queued';
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
      and (t.dispatch_started_at is null
        or t.dispatch_started_at < greatest(t.queued_at, now() - interval '2 minutes'))
    order by t.created_at
    limit 500;
end;
$$;
