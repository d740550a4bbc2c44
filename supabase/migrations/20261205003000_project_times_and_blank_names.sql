-- A project's update time is the server's, and its name is never blank, also when written through the Data API.
--
-- Clients keep UPDATE on projects.updated_at (the API renames a project as the user and stamps it in the same
-- statement), so any client could date its project to any year. A trigger now stamps every update with now(),
-- whatever the statement wrote. The API strips a name and refuses it when nothing is left; the Data API stored
-- '   '. NOT VALID: rows written before are left as they are, new writes are checked.

create function public.stamp_project_update()
returns trigger
language plpgsql set search_path = ''
as $$
begin
  new.updated_at := now();
  return new;
end;
$$;
revoke execute on function public.stamp_project_update() from public, anon, authenticated;

create trigger projects_stamp_update
  before update on public.projects
  for each row execute function public.stamp_project_update();

alter table public.projects add constraint projects_name_not_blank
  check (btrim(name, E' \t\n\r\f\v') <> '') not valid;
