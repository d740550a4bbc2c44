-- 1. A task whose Modal call still waits in Modal's queue is noted as waiting (its message says so, and the reaper
--    asks about it again 20 minutes later, not every minute): otherwise the longest-waiting tasks filled the
--    reaper's list each pass and a task whose spawn had failed was never reached.
-- 2. A deleted account is swept twice: at once, and again once every signed upload URL it held has expired
--    (a PUT through one after the first sweep left a file nobody owned). A user created again with the same id
--    is no longer departed.

create function public.note_task_waiting(p_task_id uuid, p_call_id text)
returns boolean
language sql security definer set search_path = ''
as $$
  with noted as (
    update public.tasks set message = 'Waiting for a free worker', updated_at = now()
    where id = p_task_id and status = 'queued' and call_id = p_call_id
    returning 1
  )
  select exists (select 1 from noted);
$$;
revoke execute on function public.note_task_waiting(uuid, text) from public, anon, authenticated;
grant execute on function public.note_task_waiting(uuid, text) to service_role;

alter table public.departed_users add column swept_at timestamptz;
comment on column public.departed_users.swept_at is
  'When the files were last swept; the row goes once a sweep ran after every upload URL of the account expired.';

create function public.forget_returning_user()
returns trigger
language plpgsql security definer set search_path = ''
as $$
begin
  delete from public.departed_users where user_id = new.id;
  return new;
end;
$$;
revoke execute on function public.forget_returning_user() from public, anon, authenticated;

create trigger on_auth_user_returned
  after insert on auth.users
  for each row execute function public.forget_returning_user();
