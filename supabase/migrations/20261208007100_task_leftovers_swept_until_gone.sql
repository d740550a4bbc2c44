-- A task's leftover files (what an attempt uploaded but never saved as an asset) are removed until a removal
-- succeeds, not tried once.
--
-- They were removed once, as the task ended: by the attempt that completed it, by the cancel, or by the reaper that
-- gave up on it. Storage refusing that one call, or the process dying before it, left them for good; and a job whose
-- container Modal stopped for a cancel could finish an upload after the cancel had looked, leaving a file in storage
-- that no asset refers to and nothing would ever remove.
--
-- A task that may have left some (it ended after any attempt but a first one that completed it) is now noted in
-- task_output_sweeps as it ends. The reaper takes the noted tasks once no attempt of theirs can still be uploading,
-- removes their leftovers, and forgets a task only once that worked; a try that fails comes round again later.

create table public.task_output_sweeps (
  task_id uuid primary key references public.tasks (id) on delete cascade,
  due_at timestamptz not null default now()
);
comment on table public.task_output_sweeps is
  'Ended tasks whose leftover files the reaper still has to remove (server only: RLS on, no policy, no grants).';
comment on column public.task_output_sweeps.due_at is
  'When the task ended, or when a sweep last took it; swept once p_after_seconds have passed since.';
alter table public.task_output_sweeps enable row level security;
revoke all on public.task_output_sweeps from public, anon, authenticated;
create index task_output_sweeps_due_idx on public.task_output_sweeps (due_at);

create function public.note_task_output_sweep()
returns trigger
language plpgsql security definer set search_path = ''
as $$
begin
  insert into public.task_output_sweeps (task_id) values (new.id) on conflict (task_id) do nothing;
  return new;
end;
$$;
revoke execute on function public.note_task_output_sweep() from public, anon, authenticated;

create trigger tasks_note_output_sweep
  after update of status on public.tasks
  for each row
  when (new.status in ('completed', 'failed', 'canceled') and old.status in ('queued', 'processing')
    and new.attempts > 0 and (new.status <> 'completed' or new.attempts > 1))
  execute function public.note_task_output_sweep();

-- Tasks that ended before this migration are swept once too.
insert into public.task_output_sweeps (task_id, due_at)
select t.id, coalesce(t.finished_at, t.updated_at) from public.tasks t
where t.status in ('completed', 'failed', 'canceled') and t.attempts > 0
  and (t.status <> 'completed' or t.attempts > 1)
on conflict (task_id) do nothing;

-- take_task_output_sweeps: up to p_limit tasks noted more than p_after_seconds ago, oldest first. Each is taken for
-- the next p_after_seconds: another pass skips it, and one that fails or dies leaves it to a later pass.
create function public.take_task_output_sweeps(p_after_seconds int, p_limit int)
returns setof uuid
language sql security definer set search_path = ''
as $$
  update public.task_output_sweeps s set due_at = now()
  where s.task_id in (
    select d.task_id from public.task_output_sweeps d
    where d.due_at < now() - make_interval(secs => p_after_seconds)
    order by d.due_at
    limit p_limit
    for update skip locked
  )
  returning s.task_id;
$$;
revoke execute on function public.take_task_output_sweeps(int, int) from public, anon, authenticated;
grant execute on function public.take_task_output_sweeps(int, int) to service_role;

create function public.forget_task_output_sweep(p_task_id uuid)
returns void
language sql security definer set search_path = ''
as $$
  delete from public.task_output_sweeps where task_id = p_task_id;
$$;
revoke execute on function public.forget_task_output_sweep(uuid) from public, anon, authenticated;
grant execute on function public.forget_task_output_sweep(uuid) to service_role;
