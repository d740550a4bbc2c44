-- A call claims its task and records itself on it in one statement. The claim and record_task_call were two:
-- when a task had two calls (a re-dispatch while the first was starting), its call_id still named the other one
-- between them, and that call, finding the task claimed, took it over with reclaim_task (which trusts call_id):
-- the call that won the claim lost its attempt, and the task ran twice. record_task_call goes with it.

drop function public.claim_task(uuid);

create function public.claim_task(p_task_id uuid, p_call_id text default null)
returns setof public.tasks
language sql security definer set search_path = ''
as $$
  update public.tasks set
    status = 'processing', attempts = attempts + 1, message = null, call_id = coalesce(p_call_id, call_id),
    started_at = coalesce(started_at, now()), heartbeat_at = now(), updated_at = now()
  where id = p_task_id and status = 'queued'
  returning *;
$$;
revoke execute on function public.claim_task(uuid, text) from public, anon, authenticated;
grant execute on function public.claim_task(uuid, text) to service_role;

drop function public.record_task_call(uuid, int, text);
