-- Modal runs an input again when it loses the container that ran it (preemption, a crash). The rerun has the same
-- call id, but finds its task 'processing' under the lost attempt, so claim_task turns it away and the task waits
-- for the reaper (a stall timeout, and an attempt spent either way). reclaim_task lets the call that holds the
-- task take it over at once, as a new attempt: the lost one, were it still alive, can write nothing more.

create function public.reclaim_task(p_task_id uuid, p_call_id text, p_max_attempts int)
returns setof public.tasks
language sql security definer set search_path = ''
as $$
  update public.tasks set
    attempts = attempts + 1, message = 'Resuming after the worker was lost.',
    heartbeat_at = now(), updated_at = now()
  where id = p_task_id and status = 'processing' and call_id = p_call_id and attempts < p_max_attempts
  returning *;
$$;
revoke execute on function public.reclaim_task(uuid, text, int) from public, anon, authenticated;
grant execute on function public.reclaim_task(uuid, text, int) to service_role;
