-- A signed upload URL stays valid for two hours whatever happens to its asset. Once the asset is deleted, a file
-- sent through that URL would have no row, and nothing would ever remove it. A tombstone keeps the path until
-- the URL has expired; the reaper then removes whatever arrived there, and the tombstone with it. Tombstones count
-- toward the user's cap of uploads not yet ready, so deleting does not hand out more room.

create table public.upload_tombstones (
  path text primary key,
  user_id uuid not null references auth.users (id) on delete cascade,
  expires_at timestamptz not null
);
comment on table public.upload_tombstones is
  'Paths of deleted uploads whose signed upload URL is still valid (server only: RLS on, no policy, no grants).';
alter table public.upload_tombstones enable row level security;
revoke all on public.upload_tombstones from public, anon, authenticated;
create index upload_tombstones_user_idx on public.upload_tombstones (user_id, expires_at);
