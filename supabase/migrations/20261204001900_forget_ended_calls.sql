-- A Modal call that ended without taking its task (it crashed before its claim) is forgotten, so that a respawn
-- failing afterwards is retried by the reaper a minute later (a task with no call), not only after 20 minutes.
-- A call still waiting in Modal's queue is left there: spawning the task again would only lose its place.

create function public.forget_task_call(p_task_id uuid, p_call_id text)
returns boolean
language sql security definer set search_path = ''
as $$
  with forgotten as (
    update public.tasks set call_id = null, updated_at = now()
    where id = p_task_id and status = 'queued' and call_id = p_call_id
    returning 1
  )
  select exists (select 1 from forgotten);
$$;
revoke execute on function public.forget_task_call(uuid, text) from public, anon, authenticated;
grant execute on function public.forget_task_call(uuid, text) to service_role;
