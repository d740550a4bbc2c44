-- The project a task was asked for, kept after that project is deleted (project_id is then set null): a replay
-- of its request (same Idempotency-Key) is matched against what was asked, not against what is left.

alter table public.tasks add column requested_project_id uuid;
comment on column public.tasks.requested_project_id is
  'project_id as created (not cleared when the project is deleted); replays are compared with it.';
update public.tasks set requested_project_id = project_id where project_id is not null;

create function public.remember_requested_project()
returns trigger
language plpgsql set search_path = ''
as $$
begin
  new.requested_project_id := new.project_id;
  return new;
end;
$$;
revoke execute on function public.remember_requested_project() from public, anon, authenticated;

create trigger tasks_remember_requested_project
  before insert on public.tasks
  for each row execute function public.remember_requested_project();
