-- A cancel that lands while a spawn is in flight (after start_task_dispatch, before the call id is recorded) refunds
-- the task and finds no call to cancel; the spawn then returned a call that set_task_dispatch no longer recorded (the
-- task had left the queue), so nobody canceled it: it waited in Modal's queue for a GPU and started a container only
-- to find its task gone. set_task_dispatch now returns the task's status and call id after its write, so the
-- dispatcher can cancel a call whose task ended without it. The message rule is the previous migration's.

drop function public.set_task_dispatch(uuid, text, text);

create function public.set_task_dispatch(p_task_id uuid, p_call_id text, p_message text default null)
returns table (status text, call_id text)
language plpgsql security definer set search_path = ''
as $$
begin
  update public.tasks t set call_id = coalesce(p_call_id, t.call_id),
    message = case
      when p_call_id is not null and t.message = 'Waiting for a worker (dispatch will be retried).' then p_message
      else coalesce(p_message, t.message)
    end,
    dispatch_started_at = null, updated_at = now()
  where t.id = p_task_id and t.status = 'queued';
  return query select t.status, t.call_id from public.tasks t where t.id = p_task_id;
end;
$$;
revoke execute on function public.set_task_dispatch(uuid, text, text) from public, anon, authenticated;
grant execute on function public.set_task_dispatch(uuid, text, text) to service_role;
