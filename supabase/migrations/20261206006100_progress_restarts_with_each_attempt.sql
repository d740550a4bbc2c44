-- A task's progress is its current attempt's: a retry starts again from 0.
--
-- report_task_progress keeps progress from going back within an attempt (greatest), so after a requeue the bar
-- stayed at the last attempt's high point (90 %, say) for the whole rerun, which does all the work again, and
-- looked frozen until the rerun passed it. Every way back to the queue (the reaper, a released or requeued
-- attempt) and every new claim (a claim, a takeover by the same call) now sets it to 0.

create function public.restart_task_progress()
returns trigger
language plpgsql set search_path = ''
as $$
begin
  new.progress := 0;
  return new;
end;
$$;
revoke execute on function public.restart_task_progress() from public, anon, authenticated;

create trigger tasks_restart_progress
  before update of status, attempts on public.tasks
  for each row
  when ((new.status = 'queued' and old.status <> 'queued') or new.attempts > old.attempts)
  execute function public.restart_task_progress();
