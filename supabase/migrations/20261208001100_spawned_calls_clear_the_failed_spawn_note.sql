-- A spawn that failed leaves its task queued with the note "Waiting for a worker (dispatch will be retried)." (see
-- TaskService.dispatch). When a later spawn succeeded, set_task_dispatch recorded the call but kept the note, so the
-- task said its dispatch would be retried while its call was already waiting in Modal's queue (until the call claimed
-- it, or for 20 minutes when no GPU was free). Recording a call now replaces that note; any other message (why the
-- task went back to the queue) stays.

create or replace function public.set_task_dispatch(p_task_id uuid, p_call_id text, p_message text default null)
returns void
language sql security definer set search_path = ''
as $$
  update public.tasks set call_id = coalesce(p_call_id, call_id),
    message = case
      when p_call_id is not null and message = 'Waiting for a worker (dispatch will be retried).' then p_message
      else coalesce(p_message, message)
    end,
    dispatch_started_at = null, updated_at = now()
  where id = p_task_id and status = 'queued';
$$;
