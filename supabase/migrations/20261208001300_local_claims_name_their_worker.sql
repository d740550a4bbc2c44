-- A local worker that dies (killed, out of memory) leaves the task it was running 'processing' until its heartbeat
-- is TASK_STALL_SECONDS old (2 minutes by default), although `make dev` sees the worker exit at once and starts
-- another. A local worker's claims now name the worker in call_id (unused in local mode otherwise; every way back
-- to the queue clears it), and the worker started in place of a dead one hands that worker's tasks back at once
-- with requeue_worker_tasks: the same outcome as the reaper's for a stalled task (requeued, or failed and refunded
-- once it used its attempts: a task that kills its worker each time must not run forever), only sooner.

drop function public.claim_next_task(text[]);

create function public.claim_next_task(p_model_keys text[] default null, p_worker text default null)
returns setof public.tasks
language sql security definer set search_path = ''
as $$
  update public.tasks set
    status = 'processing', attempts = attempts + 1, message = null, call_id = p_worker,
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
revoke execute on function public.claim_next_task(text[], text) from public, anon, authenticated;
grant execute on function public.claim_next_task(text[], text) to service_role;

create function public.requeue_worker_tasks(p_worker text, p_max_attempts int)
returns table (task_id uuid, action text)
language plpgsql security definer set search_path = ''
as $$
declare
  v_task public.tasks;
begin
  for v_task in
    select * from public.tasks t
    where t.status = 'processing' and t.call_id = p_worker
    order by t.created_at
    for update
  loop
    if v_task.attempts - v_task.released_attempts >= p_max_attempts then
      perform public.finish_task(v_task.id, 'failed', null, null,
        jsonb_build_object('code', 'worker_lost',
          'message', 'The job stopped responding too many times and was refunded.'),
        'Failed after ' || (v_task.attempts - v_task.released_attempts) || ' attempts.', null);
      task_id := v_task.id; action := 'failed';
    else
      update public.tasks set status = 'queued', message = 'The worker stopped unexpectedly; retrying.',
        call_id = null, queued_at = now(), updated_at = now()
      where id = v_task.id;
      task_id := v_task.id; action := 'requeued';
    end if;
    return next;
  end loop;
end;
$$;
revoke execute on function public.requeue_worker_tasks(text, int) from public, anon, authenticated;
grant execute on function public.requeue_worker_tasks(text, int) to service_role;
