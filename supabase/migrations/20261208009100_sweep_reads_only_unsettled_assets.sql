-- The upload sweep runs with every reaper pass (each minute). Its two scans, uploads never completed and rejected
-- uploads whose file is still stored, matched on status alone, which no index covered: each pass read the whole
-- assets table. These partial indexes hold only the rows the sweep looks for, so a pass costs what it finds.

create index if not exists assets_pending_created_idx on public.assets (created_at) where status = 'pending';
create index if not exists assets_rejected_unswept_idx on public.assets (created_at)
  where status = 'rejected' and source_task_id is null
    and not coalesce((metadata ->> 'file_removed')::boolean, false);
