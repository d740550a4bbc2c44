-- The reaper sweeps at most 20 deleted accounts a pass, oldest first. An account whose files could not be removed
-- (a storage fault that outlasts a pass) stayed among the oldest, so twenty such accounts held every later one back.
-- tried_at records a failed sweep: accounts never tried go first, and the failed ones take turns after them.

alter table public.departed_users add column tried_at timestamptz;
comment on column public.departed_users.tried_at is
  'When a sweep of the account last failed; such accounts wait behind those not yet tried.';
