-- Job state that survives a retry (e.g. an external provider's job id) moves out of
-- public.tasks into a server-only table. A task row is readable by its owner through
-- the API, PostgREST and Realtime; how a job is run on our side is not theirs to see.

create table public.task_job_states (
  task_id uuid primary key references public.tasks (id) on delete cascade,
  state jsonb not null default '{}'::jsonb,
  updated_at timestamptz not null default now()
);
comment on table public.task_job_states is
  'Durable per-task job state kept across attempts (server only: RLS on, no policy, no grants to clients).';
alter table public.task_job_states enable row level security;
revoke all on public.task_job_states from public, anon, authenticated;

insert into public.task_job_states (task_id, state)
select id, state from public.tasks where state <> '{}'::jsonb;

alter table public.tasks drop column state;

-- save_task_state: merge into the job state, only for the attempt that holds the task.
create or replace function public.save_task_state(p_task_id uuid, p_attempt int, p_state jsonb)
returns boolean
language plpgsql security definer set search_path = ''
as $$
begin
  update public.tasks set heartbeat_at = now(), updated_at = now()
  where id = p_task_id and status = 'processing' and attempts = p_attempt;
  if not found then
    return false;
  end if;
  insert into public.task_job_states as s (task_id, state) values (p_task_id, p_state)
  on conflict (task_id) do update set state = s.state || excluded.state, updated_at = now();
  return true;
end;
$$;
revoke execute on function public.save_task_state(uuid, int, jsonb) from public, anon, authenticated;
grant execute on function public.save_task_state(uuid, int, jsonb) to service_role;
