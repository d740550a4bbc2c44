-- An account holds at most 1000 projects, whether it creates them through the API or the Data API.
--
-- A project is a folder of work; nothing else bounded how many one account could make, so one user could keep
-- filling the shared database (the Data API inserts many rows per request). Counted under a per-account
-- transaction lock, so two inserts at once cannot both take the last place.

create function public.limit_projects_per_account()
returns trigger
language plpgsql security definer set search_path = ''
as $$
begin
  perform pg_advisory_xact_lock(hashtext('projects:' || new.user_id::text));
  if (select count(*) from public.projects p where p.user_id = new.user_id) >= 1000 then
    raise exception 'An account holds at most 1000 projects: delete one to make room.' using errcode = 'SPP09';
  end if;
  return new;
end;
$$;
revoke execute on function public.limit_projects_per_account() from public, anon, authenticated;

create trigger projects_limit_per_account
  before insert on public.projects
  for each row execute function public.limit_projects_per_account();
