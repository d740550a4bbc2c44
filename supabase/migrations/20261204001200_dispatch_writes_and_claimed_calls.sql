-- Who holds a task's call_id. The dispatcher records the Modal call it spawned only while the task is still
-- queued: a re-dispatch that raced the original call's claim no longer overwrites the running task's call id
-- with the redundant call's (a cancel then terminated the wrong container), nor its message with "Waiting for a
-- worker" when the re-spawn failed. The call that claims a task records its own id (record_task_call), so a
-- cancel always reaches the container doing the work.

create or replace function public.set_task_dispatch(p_task_id uuid, p_call_id text, p_message text default null)
returns void
language sql security definer set search_path = ''
as $$
  update public.tasks set call_id = coalesce(p_call_id, call_id), message = coalesce(p_message, message),
    updated_at = now()
  where id = p_task_id and status = 'queued';
$$;

create function public.record_task_call(p_task_id uuid, p_attempt int, p_call_id text)
returns boolean
language sql security definer set search_path = ''
as $$
  with claimed as (
    update public.tasks set call_id = p_call_id
    where id = p_task_id and status = 'processing' and attempts = p_attempt
    returning 1
  )
  select exists (select 1 from claimed);
$$;
revoke execute on function public.record_task_call(uuid, int, text) from public, anon, authenticated;
grant execute on function public.record_task_call(uuid, int, text) to service_role;
