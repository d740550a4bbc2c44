-- Files of deleted accounts.
--
-- Deleting a user (Supabase Auth's dashboard or admin API) cascades through every row of theirs, but Storage
-- keeps the files under {user_id}/: uploads and results nobody can reach any more, billed for ever, and personal
-- data the account's deletion promised to remove. A deletion now leaves the user id here; the reaper removes the
-- files under it and then the row. Server only: RLS on, no policy.

create table public.departed_users (
  user_id uuid primary key,
  departed_at timestamptz not null default now()
);
alter table public.departed_users enable row level security;
comment on table public.departed_users is
  'Deleted accounts whose storage files the reaper has still to remove (server only, no policy).';

create function public.remember_departed_user()
returns trigger
language plpgsql security definer set search_path = ''
as $$
begin
  insert into public.departed_users (user_id) values (old.id) on conflict do nothing;
  return old;
end;
$$;
revoke execute on function public.remember_departed_user() from public, anon, authenticated;

create trigger on_auth_user_deleted
  after delete on auth.users
  for each row execute function public.remember_departed_user();
