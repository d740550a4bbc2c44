-- Projects group a user's work; assets are the user's media files in Storage.

-- ---------------------------------------------------------------------------
-- projects: owned by one user. Owner reads and writes own rows.
-- ---------------------------------------------------------------------------
create table public.projects (
  id uuid primary key default gen_random_uuid(),
  user_id uuid not null references auth.users (id) on delete cascade,
  name text not null check (char_length(name) between 1 and 200),
  description text check (char_length(description) <= 5000),
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now()
);
alter table public.projects enable row level security;
create policy "projects: owner reads" on public.projects
  for select to authenticated using ((select auth.uid()) = user_id);
create policy "projects: owner inserts" on public.projects
  for insert to authenticated with check ((select auth.uid()) = user_id);
create policy "projects: owner updates" on public.projects
  for update to authenticated using ((select auth.uid()) = user_id) with check ((select auth.uid()) = user_id);
create policy "projects: owner deletes" on public.projects
  for delete to authenticated using ((select auth.uid()) = user_id);
create index projects_user_created_idx on public.projects (user_id, created_at desc);

-- ---------------------------------------------------------------------------
-- assets: one row per object in Storage (bucket/path, path starts with the
-- owner's id). Owner reads; the server writes (uploads are probed first).
-- ---------------------------------------------------------------------------
create table public.assets (
  id uuid primary key default gen_random_uuid(),
  user_id uuid not null references auth.users (id) on delete cascade,
  project_id uuid references public.projects (id) on delete set null,
  kind text not null check (kind in ('image', 'video', 'audio')),
  bucket text not null,
  path text not null,
  mime text,
  bytes bigint check (bytes >= 0),
  width int,
  height int,
  duration_s double precision,
  fps double precision,
  source_task_id uuid,
  metadata jsonb not null default '{}'::jsonb,
  status text not null default 'pending' check (status in ('pending', 'ready', 'rejected')),
  created_at timestamptz not null default now(),
  unique (bucket, path)
);
alter table public.assets enable row level security;
create policy "assets: owner reads" on public.assets
  for select to authenticated using ((select auth.uid()) = user_id);
create index assets_user_created_idx on public.assets (user_id, created_at desc);
create index assets_source_task_idx on public.assets (source_task_id) where source_task_id is not null;
comment on column public.assets.source_task_id is 'The task that produced this asset (null for uploads).';
comment on column public.assets.metadata is 'Probe facts (container, codecs, frame count) and, when rejected, the reason.';

-- Storage bucket for all media (private: every read goes through a signed URL).
insert into storage.buckets (id, name, public) values ('media', 'media', false) on conflict (id) do nothing;
